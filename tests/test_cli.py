"""The napari-ngr command line on real (small) TIFF and NumPy files."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from skimage import data

from napari_ngr.cli import main

IT = ["--iterations", "15"]


def psnr(ref, x, mask=None):
    ref = np.asarray(ref, np.float64)
    x = np.asarray(x, np.float64)
    sel = np.ones(ref.shape, bool) if mask is None else np.broadcast_to(mask, ref.shape)
    mse = np.mean((ref[sel] - x[sel]) ** 2)
    rng = ref.max() - ref.min()
    return 10 * np.log10(rng**2 / mse)


@pytest.fixture
def camera():
    return data.camera()[120:168, 200:248]  # 48 x 48 uint8, real image


def zstack_u16(camera):
    c = camera.astype(np.uint16) * 200
    return np.stack([np.roll(c, k, axis=1) for k in range(4)])  # (4, 48, 48) uint16


def test_version_and_help_in_a_subprocess():
    out = subprocess.run([sys.executable, "-m", "napari_ngr", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("napari-ngr ")
    out = subprocess.run([sys.executable, "-m", "napari_ngr", "inpaint", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "examples:" in out.stdout and "--overwrite" in out.stdout


def test_imagej_round_trip_keeps_metadata_dtype_and_restores(tmp_path, camera):
    clean = zstack_u16(camera)
    missing = np.random.default_rng(0).random(clean.shape[1:]) < 0.3
    img = np.where(missing, 0, clean).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", img, imagej=True, resolution=(5.0, 5.0),
                     metadata={"axes": "ZYX", "spacing": 2.5, "unit": "um"})
    tifffile.imwrite(tmp_path / "s_mask.tif", missing.astype(np.uint8))
    assert main(["inpaint", str(tmp_path / "s.tif"), "-q", "--iterations", "60"]) == 0
    with tifffile.TiffFile(tmp_path / "s_ngr.tif") as tif:
        assert tif.is_imagej and tif.series[0].axes == "ZYX"
        assert tif.imagej_metadata["spacing"] == 2.5 and tif.imagej_metadata["unit"] == "um"
        x = tif.pages[0].tags["XResolution"].value
        assert x[0] / x[1] == pytest.approx(5.0)
        out = tif.asarray()
    assert out.dtype == np.uint16 and out.shape == img.shape
    np.testing.assert_array_equal(out[:, ~missing], img[:, ~missing])  # observed pixels kept
    m3 = np.broadcast_to(missing, img.shape)
    assert psnr(clean, out, m3) > psnr(clean, img, m3) + 10


def test_ome_physical_sizes_and_channel_names_survive(tmp_path, camera):
    rgb = np.stack([camera, camera[::-1], camera.T]).astype(np.float32) / 255  # (C, Y, X)
    noisy = (rgb + np.random.default_rng(1).normal(0, 0.1, rgb.shape)).astype(np.float32)
    tifffile.imwrite(tmp_path / "o.ome.tif", noisy, ome=True,
                     metadata={"axes": "CYX", "PhysicalSizeX": 0.65, "PhysicalSizeXUnit": "µm",
                               "PhysicalSizeY": 0.65, "PhysicalSizeYUnit": "µm",
                               "Channel": {"Name": ["DAPI", "GFP", "RFP"]}})
    assert main(["denoise", str(tmp_path / "o.ome.tif"), "-o", str(tmp_path / "d.ome.tif"), "--sigma", "0.1",
                 "-q", "--iterations", "40"]) == 0
    with tifffile.TiffFile(tmp_path / "d.ome.tif") as tif:
        assert tif.is_ome and tif.series[0].axes == "CYX"
        pix = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        out = tif.asarray()
    assert pix["PhysicalSizeX"] == pytest.approx(0.65) and pix["PhysicalSizeXUnit"] == "µm"
    assert [c["Name"] for c in pix["Channel"]] == ["DAPI", "GFP", "RFP"]
    assert out.dtype == np.float32 and out.shape == noisy.shape
    assert psnr(rgb, out) > psnr(rgb, noisy) + 3


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


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path, camera, capsys):
    tifffile.imwrite(tmp_path / "c.tif", camera)
    target = tmp_path / "c_ngr.tif"
    target.write_bytes(b"earlier result")
    assert main(["denoise", str(tmp_path / "c.tif"), *IT]) == 0
    assert target.read_bytes() == b"earlier result"
    assert "skipped" in capsys.readouterr().err
    assert main(["denoise", str(tmp_path / "c.tif"), "--overwrite", "-q", *IT]) == 0
    assert tifffile.imread(target).shape == camera.shape


def test_interrupted_write_leaves_no_file(tmp_path, camera, monkeypatch):
    tifffile.imwrite(tmp_path / "c.tif", camera)
    real = tifffile.imwrite

    def dying_write(path, arr, **kw):
        real(path, arr[: arr.shape[0] // 2], **kw)  # half a file on disk, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(tifffile, "imwrite", dying_write)
    assert main(["denoise", str(tmp_path / "c.tif"), "-q", *IT]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tif"]


def test_batch_goes_on_after_a_bad_file_and_exits_nonzero(tmp_path, camera, capsys):
    m = np.zeros(camera.shape, np.uint8)
    m[10:14, 5:40] = 1
    for name in ("a", "c"):
        tifffile.imwrite(tmp_path / f"{name}.tif", camera)
        tifffile.imwrite(tmp_path / f"{name}_mask.tif", m)
    (tmp_path / "b.tif").write_bytes(b"this is not a tiff")
    tifffile.imwrite(tmp_path / "b_mask.tif", m)
    tifffile.imwrite(tmp_path / "d.tif", camera)  # no mask beside it
    out = tmp_path / "out"
    assert main(["inpaint", str(tmp_path), "--output-dir", str(out), "-q", *IT]) == 1
    err = capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["a_ngr.tif", "c_ngr.tif"]
    assert "b.tif" in err and "cannot read" in err
    assert "no mask for d.tif" in err and "2 done, 0 skipped, 2 failed" in err


def test_one_mask_for_all_and_mask_mismatch(tmp_path, camera, capsys):
    m = np.zeros(camera.shape, np.uint8)
    m[20:24, :] = 1
    tifffile.imwrite(tmp_path / "dust.tif", m)
    for name in ("p", "q"):
        tifffile.imwrite(tmp_path / f"{name}.tif", camera)
    assert main(["inpaint", str(tmp_path / "p.tif"), str(tmp_path / "q.tif"), "--mask", str(tmp_path / "dust.tif"),
                 "-q", *IT]) == 0
    assert (tmp_path / "p_ngr.tif").exists() and (tmp_path / "q_ngr.tif").exists()
    tifffile.imwrite(tmp_path / "small.tif", camera[:30, :30])
    assert main(["inpaint", str(tmp_path / "small.tif"), "--mask", str(tmp_path / "dust.tif"), "-q", *IT]) == 1
    assert "does not match" in capsys.readouterr().err
    assert not (tmp_path / "small_ngr.tif").exists()


def test_gradients_one_file_per_axis(tmp_path, camera):
    tifffile.imwrite(tmp_path / "z.tif", zstack_u16(camera), imagej=True, metadata={"axes": "ZYX"})
    assert main(["denoise", str(tmp_path / "z.tif"), "--gradients", "-q", *IT]) == 0
    for ax in "zyx":
        g = tifffile.imread(tmp_path / f"z_ngr_grad-{ax}.tif")
        assert g.shape == (4, 48, 48) and g.dtype == np.float32
    assert len(list(tmp_path.glob("z_ngr_grad-*.tif"))) == 3


def test_job_that_cannot_fit_is_refused(tmp_path, camera, capsys):
    tifffile.imwrite(tmp_path / "c.tif", camera)
    assert main(["denoise", str(tmp_path / "c.tif"), "--max-memory", "0.001", *IT]) == 1
    assert "needs about" in capsys.readouterr().err
    assert not (tmp_path / "c_ngr.tif").exists()


def test_usage_errors_exit_2(tmp_path, camera):
    tifffile.imwrite(tmp_path / "a.tif", camera)
    tifffile.imwrite(tmp_path / "b.tif", camera)
    with pytest.raises(SystemExit) as e:
        main(["denoise", str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "-o", str(tmp_path / "x.tif")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["denoise", str(tmp_path / "nothing*.tif")])
    assert e.value.code == 2
    assert sorted(os.listdir(tmp_path)) == ["a.tif", "b.tif"]
