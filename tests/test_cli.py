"""The napari-ngr command line on real (small) TIFF and NumPy files.

Everything runs in-process through ``main([...])`` (one subprocess checks ``python -m napari_ngr``);
arrays are 32-48 px and iteration budgets 5-20, so the module runs in well under a minute.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from skimage import data

import napari_ngr
from napari_ngr import cli
from napari_ngr.cli import main

IT = ["--iterations", "8"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny arrays: one thread is faster, and far faster on a busy 2-core machine (no OpenMP spinning)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def psnr(ref, x, mask=None):
    ref = np.asarray(ref, np.float64)
    x = np.asarray(x, np.float64)
    sel = np.ones(ref.shape, bool) if mask is None else np.broadcast_to(mask, ref.shape)
    mse = np.mean((ref[sel] - x[sel]) ** 2)
    rng = ref.max() - ref.min()
    return 10 * np.log10(rng**2 / mse)


@pytest.fixture(scope="module")
def camera():
    return data.camera()[120:168, 200:248].copy()  # 48 x 48 uint8, a real photograph


@pytest.fixture(scope="module")
def rgb():
    return data.astronaut()[100:132, 150:182].copy()  # 32 x 32 x 3 uint8


def zstack_u16(camera):
    c = camera.astype(np.uint16) * 200
    return np.stack([np.roll(c, k, axis=1) for k in range(4)])  # (4, 48, 48) uint16


def bar_mask(shape):
    m = np.zeros(shape, np.uint8)
    m[10:14, 5:40] = 1
    return m


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------ entry points
def test_version_and_help_in_a_subprocess():
    out = subprocess.run([sys.executable, "-m", "napari_ngr", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"napari-ngr {napari_ngr.__version__}"
    out = subprocess.run([sys.executable, "-m", "napari_ngr", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for text in ("inpaint", "denoise", "decloud", "--time-axis", "examples:", "masks", "NAME_mask.tif", "NAME_ngr", "rounded half to even",
                 "--overwrite", "--resume", "exit status", "memory"):
        assert text in out.stdout, text


def test_subcommand_help_lists_every_option(capsys):
    assert main(["inpaint", "--help"]) == 0
    text = capsys.readouterr().out
    for opt in ("--mask", "--mask-suffix", "-o", "--output-dir", "--iterations", "--spatial-weight",
                "--channel-weight", "--stack-weight", "--seed", "--device", "--precision", "--channel-axis", "--axes", "--dtype",
                "--gradients", "--overwrite", "--resume", "--quiet", "--max-memory", "examples:"):
        assert opt in text, opt
    assert main(["denoise", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--sigma" in text and "--no-fallback" in text
    assert main(["decloud", "--help"]) == 0
    text = capsys.readouterr().out
    for opt in ("--mask", "--mask-suffix", "--time-axis", "--channel-axis", "--axes", "-o", "--output-dir",
                "--iterations", "--stack-weight", "--gradients", "--overwrite", "--max-memory", "(T, Y, X)",
                "napari-ngr decloud"):
        assert opt in text, opt
    assert main(["--version"]) == 0


# ------------------------------------------------------------------------- TIFF round trips
def test_imagej_round_trip_keeps_axes_resolution_dtype_and_restores(tmp_path, camera, capsys):
    clean = zstack_u16(camera)
    missing = np.random.default_rng(0).random(clean.shape[1:]) < 0.3
    img = np.where(missing, 0, clean).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", img, imagej=True, resolution=(5.0, 4.0),
                     metadata={"axes": "ZYX", "spacing": 2.5, "unit": "um", "Labels": list("abcd")})
    tifffile.imwrite(tmp_path / "s_mask.tif", missing.astype(np.uint8))  # (Y, X): every plane
    assert main(["inpaint", str(tmp_path / "s.tif"), "--iterations", "15"]) == 0
    err = capsys.readouterr().err
    assert "memory:" in err and "needs about" in err  # the up-front estimate
    assert "s.tif -> " in err and "1 done, 0 skipped, 0 failed" in err  # log line and summary
    assert any(f", start {k})" in err for k in ("biharmonic", "dct", "nonlocal", "stack"))  # the initial fill chosen
    assert "s on cpu (float32), returned" in err  # the network's arithmetic (a stack: float32 everywhere)
    with tifffile.TiffFile(tmp_path / "s_ngr.tif") as tif:
        assert tif.is_imagej and tif.series[0].axes == "ZYX"
        md = tif.imagej_metadata
        assert md["spacing"] == 2.5 and md["unit"] == "um" and md["Labels"] == list("abcd")
        assert tif.pages.first.resolution == pytest.approx((5.0, 4.0))
        out = tif.asarray()
    assert out.dtype == np.uint16 and out.shape == img.shape
    np.testing.assert_array_equal(out[:, ~missing], img[:, ~missing])  # observed pixels kept
    m3 = np.broadcast_to(missing, img.shape)
    assert psnr(clean, out, m3) > psnr(clean, img, m3) + 10


def test_imagej_hyperstack_and_rgb_keep_their_layout(tmp_path, rgb):
    tcyx = np.stack([np.moveaxis(rgb, -1, 0).astype(np.uint16) * 100] * 3)  # (T, C, Y, X)
    tifffile.imwrite(tmp_path / "t.tif", tcyx, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "TCYX", "finterval": 1.5, "unit": "um", "mode": "composite"})
    tifffile.imwrite(tmp_path / "c.tif", rgb, imagej=True, resolution=(3.0, 3.0), metadata={"unit": "mm"})
    out = tmp_path / "out"
    assert main(["denoise", str(tmp_path), "--output-dir", str(out), "--dtype", "float32", "--sigma", "10",
                 "-q", "--iterations", "5"]) == 0
    with tifffile.TiffFile(out / "t_ngr.tif") as tif:
        assert tif.is_imagej and tif.series[0].axes == "TCYX" and tif.series[0].dtype == np.float32
        assert tif.imagej_metadata["finterval"] == 1.5 and tif.imagej_metadata["unit"] == "um"
        assert tif.pages.first.resolution == pytest.approx((2.0, 2.0))
    with tifffile.TiffFile(out / "c_ngr.tif") as tif:  # RGB samples are the channel axis
        assert tif.is_imagej and tif.series[0].axes == "YXS" and tif.series[0].shape == rgb.shape
        assert tif.imagej_metadata["unit"] == "mm"


def test_ome_physical_sizes_and_channel_names_survive(tmp_path, camera):
    ref = np.stack([camera, camera[::-1], camera.T]).astype(np.float32) / 255  # (C, Y, X)
    noisy = (ref + np.random.default_rng(1).normal(0, 0.1, ref.shape)).astype(np.float32)
    tifffile.imwrite(tmp_path / "o.ome.tif", noisy, ome=True,
                     metadata={"axes": "CYX", "PhysicalSizeX": 0.65, "PhysicalSizeXUnit": "µm",
                               "PhysicalSizeY": 0.65, "PhysicalSizeYUnit": "µm",
                               "Channel": {"Name": ["DAPI", "GFP", "RFP"]}})
    assert main(["denoise", str(tmp_path / "o.ome.tif"), "-o", str(tmp_path / "d.ome.tif"), "--sigma", "0.1",
                 "-q", "--iterations", "20"]) == 0
    with tifffile.TiffFile(tmp_path / "d.ome.tif") as tif:
        assert tif.is_ome and tif.series[0].axes == "CYX"
        pix = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        out = tif.asarray()
    assert pix["PhysicalSizeX"] == pytest.approx(0.65) and pix["PhysicalSizeXUnit"] == "µm"
    assert pix["PhysicalSizeY"] == pytest.approx(0.65)
    assert [c["Name"] for c in pix["Channel"]] == ["DAPI", "GFP", "RFP"]
    assert out.dtype == np.float32 and out.shape == noisy.shape
    assert psnr(ref, out) > psnr(ref, noisy) + 3


def test_ome_z_stack_keeps_z_size_and_uint16(tmp_path, camera):
    z = zstack_u16(camera)
    tifffile.imwrite(tmp_path / "z.ome.tif", z, ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeZ": 2.0, "PhysicalSizeZUnit": "µm", "PhysicalSizeX": 0.3,
                               "PhysicalSizeY": 0.3})
    assert main(["denoise", str(tmp_path / "z.ome.tif"), "-q", "--sigma", "500", "--iterations", "5"]) == 0
    with tifffile.TiffFile(tmp_path / "z_ngr.ome.tif") as tif:  # NAME_ngr keeps the .ome.tif extension
        assert tif.is_ome and tif.series[0].axes == "ZYX" and tif.series[0].dtype == np.uint16
        pix = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    assert pix["PhysicalSizeZ"] == pytest.approx(2.0) and pix["PhysicalSizeZUnit"] == "µm"
    assert pix["PhysicalSizeX"] == pytest.approx(0.3)


def test_unmappable_file_axes_fail_clearly_unless_axes_given(tmp_path, camera, capsys):
    cube = np.stack([camera, camera.T, camera[::-1]])
    tifffile.imwrite(tmp_path / "l.tif", cube, photometric="minisblack", metadata={"axes": "EYX"})  # E: lambda
    assert main(["denoise", str(tmp_path / "l.tif"), "-q", *IT]) == 1
    assert "'EYX'" in capsys.readouterr().err
    assert main(["denoise", str(tmp_path / "l.tif"), "--axes", "CYX", "-q", "--sigma", "5", *IT]) == 0
    assert tifffile.imread(tmp_path / "l_ngr.tif").shape == cube.shape


# -------------------------------------------------------------------------------- dtypes
def test_dtype_policy(tmp_path, camera):
    img = zstack_u16(camera)
    noisy = np.clip(img + np.random.default_rng(2).normal(0, 3000, img.shape), 0, 65535).astype(np.uint16)
    np.save(tmp_path / "a.npy", noisy)
    assert main(["denoise", str(tmp_path / "a.npy"), "-q", *IT]) == 0
    out = np.load(tmp_path / "a_ngr.npy")
    assert out.dtype == np.uint16 and out.shape == noisy.shape
    assert main(["denoise", str(tmp_path / "a.npy"), "-o", str(tmp_path / "f.npy"), "--dtype", "float32",
                 "-q", *IT]) == 0
    f = np.load(tmp_path / "f.npy")
    assert f.dtype == np.float32
    np.testing.assert_array_equal(out, np.clip(np.rint(f), 0, 65535).astype(np.uint16))  # rounded, clipped


def test_convert_dtype_rounds_half_to_even_and_clips():
    x = np.array([-3.0, 0.5, 1.5, 2.5, 254.6, 300.0], np.float32)
    np.testing.assert_array_equal(cli.convert_dtype(x, np.uint8), [0, 0, 2, 2, 255, 255])
    np.testing.assert_array_equal(cli.convert_dtype(x * 1000, np.int16), [-3000, 500, 1500, 2500, 32767, 32767])
    assert cli.convert_dtype(np.array([3e9], np.float32), np.int32)[0] == np.iinfo(np.int32).max
    assert cli.convert_dtype(x, np.float64).dtype == np.float64


def test_convert_dtype_saturates_64_bit_integers_without_wrapping():
    """float64(iinfo.max) of int64/uint64 rounds up to 2**63 / 2**64: clipped to it, the cast wrapped around."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value encountered in cast"
        for dt in (np.int64, np.uint64, np.int32, np.uint32):
            info = np.iinfo(dt)
            x = np.array([float(info.max), float(info.max) * 4, float(info.min), -1e30, 7.5])
            for src in (x, x.astype(np.float32)):
                out = cli.convert_dtype(src, dt)
                assert out.dtype == dt
                assert out.tolist() == [info.max, info.max, info.min, info.min, 8], (dt, src.dtype)
        np.testing.assert_array_equal(cli.convert_dtype(np.array([1e5, -1e5, 1.5], np.float32), np.float16),
                                      np.array([65504, -65504, 1.5], np.float16))  # not inf


def test_observed_entries_are_written_back_exactly_beyond_24_bits(tmp_path):
    """int32 above 2**24 and float64 do not survive float32: observed (inpaint) and clear (decloud)
    entries are copied from the input, the filled ones are converted."""
    y, x = np.mgrid[:16, :16]
    i32 = (20_000_001 + 1000 * np.sin(y / 3) * np.cos(x / 4)).astype(np.int32)
    i32[0, 0] = 2**24 + 1
    f64 = 1.0 + np.sin(y / 3) * np.cos(x / 4) / 3 + 1e-12 * x  # bits float32 does not hold
    m = bar_mask((16, 16))
    tifffile.imwrite(tmp_path / "i.tif", i32)
    tifffile.imwrite(tmp_path / "i_mask.tif", m)
    np.save(tmp_path / "f.npy", f64)
    np.save(tmp_path / "f_mask.npy", m)
    series = np.stack([i32, i32 + 7, i32 - 5])  # (T, Y, X) int32
    clouds = np.zeros(series.shape, np.uint8)
    clouds[1, 3:7, 4:9] = 1
    np.save(tmp_path / "s.npy", series)
    np.save(tmp_path / "clouds.npy", clouds)
    assert main(["inpaint", str(tmp_path / "i.tif"), str(tmp_path / "f.npy"), "-q", "--iterations", "3"]) == 0
    assert main(["decloud", str(tmp_path / "s.npy"), "--mask", str(tmp_path / "clouds.npy"), "-q",
                 "--iterations", "3"]) == 0
    for out, ref, missing in ((tifffile.imread(tmp_path / "i_ngr.tif"), i32, m != 0),
                              (np.load(tmp_path / "f_ngr.npy"), f64, m != 0),
                              (np.load(tmp_path / "s_ngr.npy"), series, clouds != 0)):
        assert out.dtype == ref.dtype
        np.testing.assert_array_equal(out[~missing], ref[~missing])  # bit for bit
        assert np.all(np.isfinite(out.astype(np.float64)))
    assert main(["inpaint", str(tmp_path / "i.tif"), "-o", str(tmp_path / "i32f.tif"), "--dtype", "float32", "-q",
                 "--iterations", "3"]) == 0  # float32 asked for: float32 of the input
    out = tifffile.imread(tmp_path / "i32f.tif")
    np.testing.assert_array_equal(out[m == 0], i32[m == 0].astype(np.float32))


# ------------------------------------------------------------------ existing outputs, resume
def test_existing_outputs_are_skipped_unless_overwrite(tmp_path, camera, capsys):
    tifffile.imwrite(tmp_path / "c.tif", camera)
    target = tmp_path / "c_ngr.tif"
    target.write_bytes(b"earlier result")
    assert main(["denoise", str(tmp_path / "c.tif"), *IT]) == 0
    assert target.read_bytes() == b"earlier result"
    err = capsys.readouterr().err
    assert "skipped" in err and "0 done, 1 skipped, 0 failed" in err
    assert main(["denoise", str(tmp_path / "c.tif"), "--resume", *IT]) == 0  # the same, said explicitly
    assert target.read_bytes() == b"earlier result"
    assert main(["denoise", str(tmp_path / "c.tif"), "--overwrite", "--resume", *IT]) == 2
    assert main(["denoise", str(tmp_path / "c.tif"), "--overwrite", "-q", *IT]) == 0
    assert tifffile.imread(target).shape == camera.shape
    assert listing(tmp_path) == ["c.tif", "c_ngr.tif"]


def test_resume_completes_a_half_done_batch(tmp_path, camera, capsys):
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}.tif", camera)
    tifffile.imwrite(tmp_path / "a_ngr.tif", camera)  # as if a killed run had finished a.tif only
    stamp = os.stat(tmp_path / "a_ngr.tif").st_mtime_ns
    assert main(["denoise", str(tmp_path / "*.tif"), "--resume", "--sigma", "5", *IT]) == 0  # glob, in-process
    err = capsys.readouterr().err
    assert "1 done, 1 skipped, 0 failed" in err
    assert os.stat(tmp_path / "a_ngr.tif").st_mtime_ns == stamp
    assert (tmp_path / "b_ngr.tif").exists()


def test_gradients_one_file_per_axis_and_missing_ones_resumed(tmp_path, camera):
    tifffile.imwrite(tmp_path / "z.tif", zstack_u16(camera), imagej=True, metadata={"axes": "ZYX", "unit": "um"})
    assert main(["denoise", str(tmp_path / "z.tif"), "--gradients", "-q", *IT]) == 0
    assert listing(tmp_path) == ["z.tif", "z_ngr.tif", "z_ngr_grad-x.tif", "z_ngr_grad-y.tif", "z_ngr_grad-z.tif"]
    for ax in "zyx":
        with tifffile.TiffFile(tmp_path / f"z_ngr_grad-{ax}.tif") as tif:
            assert tif.is_imagej and tif.series[0].axes == "ZYX" and tif.imagej_metadata["unit"] == "um"
            g = tif.asarray()
        assert g.shape == (4, 48, 48) and g.dtype == np.float32
    gy = tifffile.imread(tmp_path / "z_ngr_grad-y.tif")
    assert np.abs(gy).max() > 0
    # a lost gradient file is recomputed (same seed, same result); existing files are kept as they are
    stamp = os.stat(tmp_path / "z_ngr.tif").st_mtime_ns
    gx = tifffile.imread(tmp_path / "z_ngr_grad-x.tif")
    os.remove(tmp_path / "z_ngr_grad-x.tif")
    assert main(["denoise", str(tmp_path / "z.tif"), "--gradients", "-q", *IT]) == 0
    assert os.stat(tmp_path / "z_ngr.tif").st_mtime_ns == stamp
    np.testing.assert_allclose(tifffile.imread(tmp_path / "z_ngr_grad-x.tif"), gx, atol=1e-3)


def test_rgb_npy_gradients_include_the_channel_axis(tmp_path, rgb):
    np.save(tmp_path / "r.npy", rgb)
    assert main(["denoise", str(tmp_path / "r.npy"), "--channel-axis", "-1", "--gradients", "-q", "--sigma", "8",
                 "--iterations", "5"]) == 0
    assert listing(tmp_path) == ["r.npy", "r_ngr.npy", "r_ngr_grad-c.npy", "r_ngr_grad-x.npy", "r_ngr_grad-y.npy"]
    assert np.load(tmp_path / "r_ngr.npy").dtype == np.uint8


# ------------------------------------------------------------------------- nothing lost
def test_interrupted_write_leaves_no_file(tmp_path, camera, monkeypatch):
    tifffile.imwrite(tmp_path / "c.tif", camera)
    real = tifffile.imwrite

    def dying_write(path, arr, **kw):
        real(path, arr[: arr.shape[0] // 2], **kw)  # half a file on disk, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(tifffile, "imwrite", dying_write)
    assert main(["denoise", str(tmp_path / "c.tif"), "-q", *IT]) == 130
    assert listing(tmp_path) == ["c.tif"]  # no output, no hidden .partial file


def test_failed_write_is_reported_and_the_batch_goes_on(tmp_path, camera, monkeypatch, capsys):
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}.tif", camera)
    real = cli.write_output
    calls = []

    def flaky(path, data, *a, **kw):
        calls.append(path)
        if len(calls) == 1:
            with open(path, "wb") as fh:
                fh.write(b"II*\0 half")
            raise OSError(28, "No space left on device")
        return real(path, data, *a, **kw)

    monkeypatch.setattr(cli, "write_output", flaky)
    assert main(["denoise", str(tmp_path), "--sigma", "5", *IT]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "1 done, 0 skipped, 1 failed" in err
    assert listing(tmp_path) == ["a.tif", "b.tif", "b_ngr.tif"]


def test_ctrl_c_during_iterations_stops_the_batch(tmp_path, camera, monkeypatch, capsys):
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}.tif", camera)

    def interrupted(self):
        yield from ()
        raise KeyboardInterrupt

    monkeypatch.setattr(napari_ngr.RestorationJob, "iterate", interrupted)
    assert main(["denoise", str(tmp_path), "--sigma", "5", *IT]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert listing(tmp_path) == ["a.tif", "b.tif"]


def test_batch_goes_on_after_a_bad_file_and_exits_nonzero(tmp_path, camera, capsys):
    m = bar_mask(camera.shape)
    for name in ("a", "c"):
        tifffile.imwrite(tmp_path / f"{name}.tif", camera)
        tifffile.imwrite(tmp_path / f"{name}_mask.tif", m)
    (tmp_path / "b.tif").write_bytes(b"this is not a tiff")
    tifffile.imwrite(tmp_path / "b_mask.tif", m)
    tifffile.imwrite(tmp_path / "d.tif", camera)  # no mask beside it
    tifffile.imwrite(tmp_path / "e.tif", camera[:30, :30])  # its mask has another shape
    tifffile.imwrite(tmp_path / "e_mask.tif", m)
    out = tmp_path / "out"
    assert main(["inpaint", str(tmp_path), "--output-dir", str(out), *IT]) == 1
    err = capsys.readouterr().err
    assert listing(out) == ["a_ngr.tif", "c_ngr.tif"]
    assert "b.tif" in err and "cannot read" in err
    assert "no mask for d.tif" in err
    assert "does not match" in err
    assert "2 done, 0 skipped, 3 failed" in err


# ---------------------------------------------------------------------------- masks
def test_mask_pairing_rule(tmp_path, camera):
    m = bar_mask(camera.shape)
    tifffile.imwrite(tmp_path / "p.tif", camera)
    np.save(tmp_path / "p_mask.npy", m)  # NAME_mask.npy pairs with NAME.tif too
    tifffile.imwrite(tmp_path / "q.tif", camera)
    tifffile.imwrite(tmp_path / "q-holes.tif", m)  # custom suffix
    assert main(["inpaint", str(tmp_path / "p.tif"), "-q", *IT]) == 0
    out = tifffile.imread(tmp_path / "p_ngr.tif")
    assert np.array_equal(out[m == 0], camera[m == 0]) and not np.array_equal(out[m == 1], camera[m == 1])
    assert main(["inpaint", str(tmp_path / "q.tif"), "--mask-suffix=-holes", "-q", *IT]) == 0
    assert (tmp_path / "q_ngr.tif").exists()
    # a folder never treats masks or earlier outputs as inputs
    found, problems = cli.expand_inputs([str(tmp_path)], "_mask")
    assert [p.name for p in found] == ["p.tif", "q-holes.tif", "q.tif"] and not problems
    found, _ = cli.expand_inputs([str(tmp_path)], "-holes")  # the suffix decides what is a mask
    assert [p.name for p in found] == ["p.tif", "p_mask.npy", "q.tif"]


def test_one_mask_for_all(tmp_path, camera):
    tifffile.imwrite(tmp_path / "dust.tif", bar_mask(camera.shape))
    for name in ("p", "q"):
        tifffile.imwrite(tmp_path / f"{name}.tif", camera)
        tifffile.imwrite(tmp_path / f"{name}_mask.tif", np.zeros_like(camera))  # ignored: --mask wins
    assert main(["inpaint", str(tmp_path / "p.tif"), str(tmp_path / "q.tif"), "--mask", str(tmp_path / "dust.tif"),
                 "--output-dir", str(tmp_path / "o"), "-q", *IT]) == 0
    assert listing(tmp_path / "o") == ["p_ngr.tif", "q_ngr.tif"]


def test_no_output_is_ever_an_input_or_a_mask_even_with_overwrite(tmp_path, camera, capsys):
    small = camera[:24, :24].copy()
    m = bar_mask(small.shape)
    tifffile.imwrite(tmp_path / "img.tif", small)
    tifffile.imwrite(tmp_path / "img_mask.tif", m)  # paired automatically
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # -o names the mask that find_mask pairs with the input: refused up front
    assert main(["inpaint", str(tmp_path / "img.tif"), "-o", str(tmp_path / "img_mask.tif"), "--overwrite",
                 "-q", *IT]) == 2
    assert "never overwritten" in capsys.readouterr().err
    # a mask suffix equal to the output suffix: NAME_ngr.tif is the mask and the output
    (tmp_path / "b").mkdir()
    tifffile.imwrite(tmp_path / "b" / "img.tif", small)
    tifffile.imwrite(tmp_path / "b" / "img_ngr.tif", m)
    files.update({f"b/{p.name}": p.read_bytes() for p in (tmp_path / "b").iterdir()})
    assert main(["inpaint", str(tmp_path / "b"), "--mask-suffix", "_ngr", "--overwrite", "-q", *IT]) == 1
    assert "img_ngr.tif is the mask of img.tif; it is never overwritten" in capsys.readouterr().err
    # gradient outputs too: one that is the --mask (with -o: a usage error) ...
    np.save(tmp_path / "o_grad-x.npy", m)
    files["o_grad-x.npy"] = (tmp_path / "o_grad-x.npy").read_bytes()
    assert main(["inpaint", str(tmp_path / "img.tif"), "--mask", str(tmp_path / "o_grad-x.npy"), "-o",
                 str(tmp_path / "o.npy"), "--gradients", "--overwrite", "-q", *IT]) == 2
    assert "gradient file" in capsys.readouterr().err
    # ... or an input, in a batch (the other file is restored)
    tifffile.imwrite(tmp_path / "img_ngr_grad-y.tif", small)
    files["img_ngr_grad-y.tif"] = (tmp_path / "img_ngr_grad-y.tif").read_bytes()
    assert main(["denoise", str(tmp_path / "img.tif"), str(tmp_path / "img_ngr_grad-y.tif"), "--gradients",
                 "--overwrite", "--sigma", "5", "-q", "--iterations", "3"]) == 1
    assert "gradient output" in capsys.readouterr().err and (tmp_path / "img_ngr_grad-y_ngr.tif").exists()
    for name, content in files.items():
        assert (tmp_path / name).read_bytes() == content, name
    assert not (tmp_path / "img_ngr.tif").exists() and not (tmp_path / "o.npy").exists()
    assert not [p for p in tmp_path.rglob(".*")]  # no hidden .partial file anywhere


def test_expand_inputs_folders_globs_and_duplicates(tmp_path):
    for name in ("a.tif", "b.TIFF", "c.npy", "c_mask.npy", "a_ngr.tif", "a_ngr_grad-y.tif", ".a_ngr.partial-1.tif",
                 "notes.txt", "z.ome.tif"):
        (tmp_path / name).write_bytes(b"")
    found, problems = cli.expand_inputs([str(tmp_path), str(tmp_path / "a.tif"), str(tmp_path / "*.npy"),
                                         str(tmp_path / "nothing*.tif"), str(tmp_path / "missing.tif")])
    assert [p.name for p in found] == ["a.tif", "b.TIFF", "c.npy", "z.ome.tif"]
    assert [r for _, r in problems] == ["no .tif/.tiff/.npy image matches this pattern", "no such file or folder"]
    assert cli.split_name("x/z.ome.tif") == ("z", ".ome.tif")
    assert cli.output_path("x/z.ome.tif", "out").as_posix() == "out/z_ngr.ome.tif"
    assert cli.gradient_path(cli.output_path("x/b.TIFF"), "t").as_posix() == "x/b_ngr_grad-t.TIFF"


# ------------------------------------------------------------------------------ memory
def test_job_that_cannot_fit_is_refused(tmp_path, camera, capsys):
    tifffile.imwrite(tmp_path / "c.tif", camera)
    assert main(["denoise", str(tmp_path / "c.tif"), "--max-memory", "0.001", "-q", *IT]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "needs about" in err and "--max-memory" in err
    assert listing(tmp_path) == ["c.tif"]


# ---------------------------------------------------------------------------- usage
def test_usage_errors_exit_2(tmp_path, camera, capsys):
    tifffile.imwrite(tmp_path / "a.tif", camera)
    tifffile.imwrite(tmp_path / "b.tif", camera)
    a, b = str(tmp_path / "a.tif"), str(tmp_path / "b.tif")
    assert main(["denoise", a, b, "-o", str(tmp_path / "x.tif")]) == 2  # -o with two inputs
    assert main(["denoise", str(tmp_path / "nothing*.tif")]) == 2
    assert main(["denoise", a, "-o", a]) == 2  # would overwrite the input
    assert main(["denoise", a, "--iterations", "0"]) == 2
    assert main(["denoise", a, "--seed", "-1"]) == 2
    assert main(["denoise", a, "--axes", "QYX"]) == 2
    assert main(["denoise", a, "--device", "tpu"]) == 2
    assert main(["denoise", a, "-o", str(tmp_path / "x.png")]) == 2
    assert main(["inpaint", a, "--mask", str(tmp_path / "none.tif")]) == 2
    assert main(["frobnicate", a]) == 2
    assert main([]) == 2
    capsys.readouterr()
    assert listing(tmp_path) == ["a.tif", "b.tif"]


def test_axes_and_channel_or_time_axis_must_agree(tmp_path, rgb, capsys):
    np.save(tmp_path / "r.npy", rgb)
    r = str(tmp_path / "r.npy")
    assert main(["denoise", r, "--axes", "YXC", "--channel-axis", "0", "-q"]) == 2
    assert "--channel-axis 0 disagrees with --axes YXC" in capsys.readouterr().err
    assert main(["denoise", r, "--axes", "YXC", "--channel-axis", "3", "-q"]) == 2
    assert main(["decloud", r, "--axes", "TYX", "--time-axis", "1", "-q"]) == 2
    assert "--time-axis 1 disagrees with --axes TYX" in capsys.readouterr().err
    assert main(["decloud", r, "--axes", "TYX", "--channel-axis", "0", "-q"]) == 2
    assert listing(tmp_path) == ["r.npy"]
    assert main(["denoise", r, "--axes", "YXC", "--channel-axis", "-1", "--sigma", "8", "-q",
                 "--iterations", "3"]) == 0  # they agree
    assert np.load(tmp_path / "r_ngr.npy").shape == rgb.shape


def test_unwritable_output_folder_is_one_usage_error_up_front(tmp_path, camera, capsys):
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}.tif", camera)
    (tmp_path / "file").write_bytes(b"")
    bad = tmp_path / "file" / "sub"  # under a file: cannot be created
    assert main(["denoise", str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "--output-dir", str(bad), *IT]) == 2
    err = capsys.readouterr().err
    assert err.count("error") == 1 and f"--output-dir {bad}" in err and "FAILED" not in err
    assert main(["denoise", str(tmp_path / "a.tif"), "-o", str(bad / "a.tif"), *IT]) == 2
    assert "cannot create the folder" in capsys.readouterr().err
    assert listing(tmp_path) == ["a.tif", "b.tif", "file"]


def test_device_names_are_case_insensitive(tmp_path, camera):
    np.save(tmp_path / "c.npy", camera[:24, :24])
    assert main(["denoise", str(tmp_path / "c.npy"), "--device", "CPU", "--sigma", "5", "-q",
                 "--iterations", "2"]) == 0
    assert (tmp_path / "c_ngr.npy").exists()


def test_corrupt_tiff_gives_one_message_and_no_tifffile_log(tmp_path, caplog, capsys):
    (tmp_path / "bad.tif").write_bytes(b"II*\0garbage")  # a TIFF header, then nonsense
    with caplog.at_level("DEBUG"):
        assert main(["denoise", str(tmp_path / "bad.tif"), "-q", *IT]) == 1
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]
    err = capsys.readouterr().err
    assert "bad.tif: cannot read bad.tif:" in err and "invalid offset" in err and "<tifffile" not in err
    assert listing(tmp_path) == ["bad.tif"]


# ----------------------------------------------------------------------------- quality
def test_restored_output_beats_the_input(tmp_path, camera):
    noisy = np.clip(camera + np.random.default_rng(5).normal(0, 20, camera.shape), 0, 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "noisy.tif", noisy)
    assert main(["denoise", str(tmp_path / "noisy.tif"), "-o", str(tmp_path / "clean.tif"), "--sigma", "20",
                 "-q", "--iterations", "20"]) == 0
    out = tifffile.imread(tmp_path / "clean.tif")
    assert out.dtype == np.uint8 and out.shape == camera.shape
    gain = psnr(camera, out) - psnr(camera, noisy)
    assert gain > 2, f"only {gain:.2f} dB"


def test_mixed_noise_option(tmp_path):
    clean = data.camera()[100:148, 200:248].astype(np.float32) / 255
    rng = np.random.default_rng(0)
    noisy = clean + rng.normal(0, 0.05, clean.shape).astype(np.float32)
    imp = rng.random(clean.shape) < 0.1
    noisy[imp] = rng.integers(0, 2, imp.sum())
    np.save(tmp_path / "sp.npy", noisy.astype(np.float32))
    assert main(["denoise", str(tmp_path / "sp.npy"), "--noise", "mixed", "--iterations", "40", "-q"]) == 0
    out = np.load(tmp_path / "sp_ngr.npy")
    assert psnr(clean, out) > psnr(clean, noisy) + 8


def test_mixed_noise_destripes_unless_told_not_to(tmp_path, cube):
    """Stripes weaker than the impulse threshold (0.2 < 3 sigma) are removed only by the stripe
    model; --no-destripe keeps them."""
    rng = np.random.default_rng(1)
    noisy = (cube + rng.normal(0, 0.1, cube.shape)).astype(np.float32)
    cols = np.arange(4, 48, 6)
    noisy[5][:, cols] += 0.2
    np.save(tmp_path / "cube.npy", noisy)
    common = ["denoise", str(tmp_path / "cube.npy"), "--noise", "mixed", "--channel-axis", "0",
              "--iterations", "40", "-q"]
    assert main(common + ["-o", str(tmp_path / "a.npy")]) == 0
    assert main(common + ["--no-destripe", "-o", str(tmp_path / "b.npy")]) == 0
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    resid_a = np.abs((a[5] - cube[5])[:, cols].mean(axis=0)).mean()
    resid_b = np.abs((b[5] - cube[5])[:, cols].mean(axis=0)).mean()
    assert resid_a < 0.05 < resid_b


# ---------------------------------------------------------------------------- decloud
def cloudy_series_u16(camera):
    """A (4, 32, 32) uint16 time series (per-date gain and offset, noise) with clouds (60000) on dates 1
    and 2, and its (T, Y, X) cloud mask."""
    c = camera[8:40, 8:40].astype(np.float64)
    noise = np.random.default_rng(3).normal(0, 150, (4, 32, 32))
    clean = np.stack([c * g + o for g, o in ((200, 1000), (190, 1500), (210, 700), (205, 1200))]) + noise
    clean = np.clip(clean, 0, 65535).astype(np.uint16)
    yy, xx = np.mgrid[:32, :32]
    cloud = ((yy - 12) / 7.0) ** 2 + ((xx - 14) / 8.0) ** 2 <= 1
    mask = np.zeros(clean.shape, np.uint8)
    mask[1] = cloud
    mask[2] = np.roll(cloud, (12, 10), axis=(0, 1))
    return clean, np.where(mask != 0, 60000, clean).astype(np.uint16), mask


def test_decloud_time_series_restores_the_clouds(tmp_path, camera, capsys):
    clean, cloudy, mask = cloudy_series_u16(camera)
    tifffile.imwrite(tmp_path / "s.tif", cloudy, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "TYX", "finterval": 5.0, "unit": "m"})
    tifffile.imwrite(tmp_path / "s_mask.tif", mask, photometric="minisblack")  # beside NAME.tif, (T, Y, X)
    assert main(["decloud", str(tmp_path / "s.tif"), "--iterations", "30"]) == 0
    err = capsys.readouterr().err
    assert "memory:" in err and "s.tif -> " in err and "1 done, 0 skipped, 0 failed" in err
    with tifffile.TiffFile(tmp_path / "s_ngr.tif") as tif:
        assert tif.is_imagej and tif.series[0].axes == "TYX"
        assert tif.imagej_metadata["finterval"] == 5.0 and tif.imagej_metadata["unit"] == "m"
        out = tif.asarray()
    assert out.dtype == np.uint16 and out.shape == cloudy.shape
    clear = mask == 0
    np.testing.assert_array_equal(out[clear], cloudy[clear])  # clear pixels unchanged
    m = mask != 0
    assert psnr(clean, out, m) > psnr(clean, cloudy, m) + 10
    # resume: the output exists, the file is skipped
    assert main(["decloud", str(tmp_path / "s.tif"), "--iterations", "30"]) == 0
    assert "skipped" in capsys.readouterr().err


def test_decloud_time_axis_option_and_gradients(tmp_path, camera):
    _, cloudy, mask = cloudy_series_u16(camera)
    yxt = np.moveaxis(cloudy, 0, -1).astype(np.float32)  # dates last: (Y, X, T)
    np.save(tmp_path / "v.npy", yxt)
    np.save(tmp_path / "clouds.npy", np.moveaxis(mask, 0, -1))
    assert main(["decloud", str(tmp_path / "v.npy"), "--mask", str(tmp_path / "clouds.npy"), "--time-axis", "2",
                 "--gradients", "-q", *IT]) == 0
    assert listing(tmp_path) == ["clouds.npy", "v.npy", "v_ngr.npy", "v_ngr_grad-t.npy", "v_ngr_grad-x.npy",
                                 "v_ngr_grad-y.npy"]
    out = np.load(tmp_path / "v_ngr.npy")
    assert out.dtype == np.float32 and out.shape == yxt.shape
    clear = np.moveaxis(mask, 0, -1) == 0
    np.testing.assert_array_equal(out[clear], yxt[clear])
    assert np.load(tmp_path / "v_ngr_grad-t.npy").shape == yxt.shape


def test_decloud_single_date_fails_clearly(tmp_path, camera, capsys):
    _, cloudy, mask = cloudy_series_u16(camera)
    tifffile.imwrite(tmp_path / "one.tif", cloudy[1], imagej=True)  # one date: (Y, X)
    tifffile.imwrite(tmp_path / "one_mask.tif", mask[1])
    np.save(tmp_path / "t1.npy", cloudy[1:2])  # (1, Y, X): a T axis of length 1
    np.save(tmp_path / "t1_mask.npy", mask[1:2])
    assert main(["decloud", str(tmp_path), *IT]) == 1
    err = capsys.readouterr().err
    assert "one.tif: FAILED: a single date" in err and "use inpaint" in err
    assert "t1.npy: FAILED:" in err and "at least 2 dates" in err
    assert "0 done, 0 skipped, 2 failed" in err
    assert listing(tmp_path) == ["one.tif", "one_mask.tif", "t1.npy", "t1_mask.npy"]


def test_denoise_logs_the_nlmeans_fallback_and_no_fallback_keeps_the_network(tmp_path, capsys, moving_board):
    board, noisy = moving_board
    tifffile.imwrite(tmp_path / "b.tif", noisy, imagej=True, metadata={"axes": "ZYX"})
    args = ["denoise", str(tmp_path / "b.tif"), "--iterations", "5", "--sigma", "0.1"]
    assert main(args + ["-o", str(tmp_path / "fb.tif")]) == 0
    assert "NL-means of the observation was returned" in capsys.readouterr().err
    assert main(args + ["--no-fallback", "-o", str(tmp_path / "ngr.tif")]) == 0
    err = capsys.readouterr().err
    assert "b.tif -> " in err and "NL-means" not in err and "returned iteration 5" in err
    fb, ngr = tifffile.imread(tmp_path / "fb.tif"), tifffile.imread(tmp_path / "ngr.tif")
    assert psnr(board, fb) > psnr(board, ngr) + 3


def test_denoise_poisson_noise(tmp_path, capsys, camera):
    clean = camera[:48, :48] / 255.0
    counts = (100 + 2 * np.random.default_rng(0).poisson(20 * clean)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "c.tif", counts)
    assert main(["denoise", str(tmp_path / "c.tif"), "--noise", "poisson", "--sigma", "3"]) == 2
    assert "--sigma is for Gaussian noise" in capsys.readouterr().err
    assert main(["denoise", str(tmp_path / "c.tif"), "--noise", "poisson", "--iterations", "20",
                 "-o", str(tmp_path / "d.tif")]) == 0
    err = capsys.readouterr().err
    assert "noise variance" in err and "sigma" not in err.split("c.tif -> ")[-1]
    out = tifffile.imread(tmp_path / "d.tif")
    truth = 100 + 40 * clean
    assert out.dtype == np.uint16 and psnr(truth, out) > psnr(truth, counts) + 5


def test_precision_option_reaches_the_network(tmp_path, camera):
    noisy = (camera[:40, :40] / 255.0 + np.random.default_rng(0).normal(0, 0.1, (40, 40))).astype(np.float32)
    tifffile.imwrite(tmp_path / "n.tif", noisy)
    outs = {}
    for prec in ("float32", "bfloat16"):
        assert main(["denoise", str(tmp_path / "n.tif"), "--iterations", "8", "--sigma", "0.1", "--precision", prec,
                     "--no-fallback", "-o", str(tmp_path / f"{prec}.tif"), "-q"]) == 0
        outs[prec] = tifffile.imread(tmp_path / f"{prec}.tif")
    assert outs["bfloat16"].dtype == np.float32 and outs["bfloat16"].shape == noisy.shape
    assert not np.array_equal(outs["bfloat16"], outs["float32"])
