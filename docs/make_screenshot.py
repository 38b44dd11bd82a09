"""Make ``docs/screenshot.png``: napari with the Restore widget docked, a restored time-lapse and
its gradient maps.

Opens the plugin's "time-lapse with missing lines" sample, docks the widget, runs the
inpainting with a modest budget (300 iterations, early stopping off), then shows the damaged
input, the restored stack and two of its gradient layers (∇t, ∇y) in napari's grid mode and
saves the whole window.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshot.py [OUT.png] [--iterations N]

(Headless: under Xvfb, never on the offscreen Qt platform.)
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", nargs="?", default=str(Path(__file__).with_name("screenshot.png")))
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--early-stopping-off", action="store_true", default=True,
                    help="(default) run the whole budget and keep the last iterate")
    ap.add_argument("--early-stopping", dest="early_stopping_off", action="store_false",
                    help="the library default: held-out pixels pick the iterate")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args(argv)
    # keep the user's persistent widget settings untouched
    os.environ.setdefault("NAPARI_NGR_SETTINGS", str(Path(tempfile.mkdtemp()) / "napari-ngr.ini"))

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_ngr._qt import RestoreWidget
    from napari_ngr._sample_data import timelapse_sample

    if args.threads:
        torch.set_num_threads(args.threads)

    viewer = napari.Viewer(title="napari-ngr: Restore (NGR)", show=True)  # shown (on Xvfb): real layout
    viewer.window.resize(1560, 920)
    for data, kw, kind in timelapse_sample(args.size):
        getattr(viewer, f"add_{kind}")(data, **kw)
    image, mask = viewer.layers[0], viewer.layers[1]
    widget = RestoreWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Restore (NGR)", area="right")
    widget.task_combo.setCurrentText("inpaint")
    widget.iterations_spin.setValue(args.iterations)
    widget.preview_spin.setValue(25)
    widget.seed_spin.setValue(0)
    # Lines missing in a stack: the held-out single pixels would pick the biharmonic start, so run
    # the whole budget and keep the last iterate (see the widget's "Early stopping" tooltip).
    widget.early_stop_check.setChecked(not args.early_stopping_off)

    app = QApplication.instance()
    t0 = time.perf_counter()
    widget.run()
    while widget.is_running:
        app.processEvents()
        time.sleep(0.02)
    print(f"restored in {time.perf_counter() - t0:.1f} s: {widget.status_label.text()}")

    name = image.name
    restored = viewer.layers[f"{name} restored"]
    grads = {a: viewer.layers[f"{name} \u2207{a}"] for a in "tyx"}
    # the grid, row by row: damaged input | restored / ∇t | ∇y (∇x and the mask stay in the
    # layer list, hidden: hidden layers take no grid cell)
    grads["t"].visible = grads["y"].visible = True
    mask.visible = False
    for i, layer in enumerate([image, restored, grads["t"], grads["y"], grads["x"], mask]):
        viewer.layers.move(viewer.layers.index(layer), i)
    grid = viewer.canvas.grid if hasattr(viewer, "canvas") else viewer.grid
    grid.enabled = True
    grid.shape = (2, 2)
    grid.spacing = 0.03
    viewer.dims.set_current_step(0, 6)
    viewer.layers.selection.active = restored
    for _ in range(10):
        app.processEvents()
        time.sleep(0.05)
    viewer.reset_view()
    for _ in range(10):
        app.processEvents()
        time.sleep(0.05)
    shot = viewer.screenshot(args.output, canvas_only=False)
    print(f"saved {args.output} {shot.shape}")
    # numbers for the README caption
    from napari_ngr._sample_data import make_timelapse
    from skimage.metrics import peak_signal_noise_ratio as psnr

    clean = make_timelapse(args.size)["clean"]
    print(f"PSNR damaged {psnr(clean, np.asarray(image.data), data_range=1):.2f} dB -> "
          f"restored {psnr(clean, np.asarray(restored.data), data_range=1):.2f} dB")
    viewer.close()


if __name__ == "__main__":
    main()
