"""Device selection: "auto" picks CUDA, then MPS, then CPU; never a hard-coded ``.cuda()``."""

from __future__ import annotations

import torch

__all__ = ["available_devices", "resolve_device"]


def _mps_ok() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """Devices this machine can run on, best first (always ends with ``"cpu"``)."""
    out = []
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.device_count() > 1 else ["cuda"]
    if _mps_ok():
        out.append("mps")
    out.append("cpu")
    return out


def resolve_device(device=None) -> torch.device:
    """Turn ``None``/``"auto"``/``"cpu"``/``"cuda[:i]"``/``"mps"`` into a usable ``torch.device``.

    Raises
    ------
    ValueError
        If the device is unknown or not available on this machine.
    """
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_ok():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'mps'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for but CUDA is not available here; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type == "mps":
        if not _mps_ok():
            raise ValueError(f"device={device!r} was asked for but MPS is not available here; use device='cpu'")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; use 'auto', 'cpu', 'cuda' or 'mps'")
    return dev
