"""Gradient operators, their adjoints, the DCT and the closed-form solve."""

import numpy as np
import pytest
import scipy.fft
import torch

from napari_ngr._dct import dct, idct
from napari_ngr.gradients import GradientSolver, forward_difference, forward_difference_adjoint


@pytest.mark.parametrize("dim", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (1, 3, 7, 2), (5, 1, 3, 9)])
def test_gradient_adjoint(shape, dim):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    lhs = torch.sum(forward_difference(x, dim) * y)
    rhs = torch.sum(x * forward_difference_adjoint(y, dim))
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_forward_difference_convention():
    x = torch.tensor([1.0, 4.0, 9.0, 16.0])
    assert forward_difference(x, 0).tolist() == [3.0, 5.0, 7.0, 0.0]  # Neumann: last entry 0


@pytest.mark.parametrize("n", [1, 2, 5, 8, 13])
def test_dct_matches_scipy_and_inverts(n):
    x = torch.randn(3, n, 4, dtype=torch.float64)
    ref = scipy.fft.dct(x.numpy(), axis=1, norm="ortho")
    np.testing.assert_allclose(dct(x, 1).numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(idct(dct(x, 1), 1).numpy(), x.numpy(), atol=1e-12)


def _dense_difference(n):
    d = np.zeros((n, n))
    for k in range(n - 1):
        d[k, k], d[k, k + 1] = -1.0, 1.0
    return d


@pytest.mark.parametrize("mu", [0.1, 5.0])
def test_dct_solve_equals_dense_solve(mu):
    shape = (2, 3, 4, 5)
    weights = {0: 2.0, 1: 0.5, 2: 1.0, 3: 1.0}
    n = int(np.prod(shape))
    A = mu * np.eye(n)
    for dim, w in weights.items():
        mats = [np.eye(s) for s in shape]
        mats[dim] = _dense_difference(shape[dim])
        D = mats[0]
        for m in mats[1:]:
            D = np.kron(D, m)
        A += w * D.T @ D
    b = np.random.default_rng(1).standard_normal(shape)
    dense = np.linalg.solve(A, b.ravel()).reshape(shape)
    solver = GradientSolver(shape, weights, dtype=torch.float64)
    fast = solver.solve(torch.from_numpy(b), mu).numpy()
    np.testing.assert_allclose(fast, dense, atol=1e-10)


def test_divergence_term_is_weighted_adjoint():
    shape = (1, 3, 6, 7)
    solver = GradientSolver(shape, {1: 0.5, 2: 1.0, 3: 2.0}, dtype=torch.float64)
    f = {d: torch.randn(shape, dtype=torch.float64) for d in (1, 2, 3)}
    expected = sum(w * forward_difference_adjoint(f[d], d) for d, w in {1: 0.5, 2: 1.0, 3: 2.0}.items())
    assert torch.allclose(solver.divergence_term(f), expected)


def test_holdout_copies_the_mask_pattern():
    """Dead rows in the mask give held-out row segments (as hard as the real gaps); scattered
    missing pixels at high rates give scattered whole pixels. Held-out entries are observed."""
    from napari_ngr.operators import Inpainting

    gen = torch.Generator().manual_seed(0)
    obs = torch.ones((4, 1, 48, 48), dtype=torch.bool)
    obs[:, :, [5, 17, 30], :] = False
    y = torch.rand(obs.shape)
    train, held = Inpainting(y * obs, obs).holdout(0.03, gen)
    assert held.any() and not (held & ~obs).any()
    assert torch.equal(train.observed, obs & ~held)
    rows = held.sum(-1)[held.any(-1)]
    assert int(rows.min()) >= 8  # whole segments of rows, not isolated pixels
    assert 0.01 < held.sum() / obs.sum() < 0.25

    sparse = torch.rand((1, 3, 48, 48), generator=gen)[:, :1].expand(1, 3, 48, 48) < 0.2  # 80 % missing
    _, held2 = Inpainting(torch.rand(sparse.shape) * sparse, sparse).holdout(0.05, gen)
    assert held2.any() and not (held2 & ~sparse).any()
    assert torch.equal(held2[:, 0], held2[:, 1]) and torch.equal(held2[:, 0], held2[:, 2])  # whole pixels


def test_holdout_moves_a_one_plane_defect_to_other_planes():
    """A large defect of one plane is held out as the same shape in another plane (rolled within
    its own plane, it would mostly land on itself); defects spread over the planes stay in theirs."""
    from napari_ngr.operators import Inpainting

    obs = torch.ones((6, 1, 48, 48), dtype=torch.bool)
    obs[2, :, 4:40, 2:38] = False  # 56 % of plane 2
    y = torch.rand(obs.shape)
    for seed in range(3):
        _, held = Inpainting(y * obs, obs).holdout(0.03, torch.Generator().manual_seed(seed))
        planes = held.sum(dim=(1, 2, 3))
        assert not (held & ~obs).any() and int((planes > 0).sum()) == 1 and int(planes[2]) == 0
        assert 0.02 * obs.sum() <= planes.max() <= 0.25 * obs.sum()  # the fraction, in one other plane
    even = torch.ones((6, 1, 48, 48), dtype=torch.bool)
    for s in range(6):
        even[s, :, 3 * s + 4, :] = False  # one dead row per plane, a different row each
    _, held = Inpainting(y * even, even).holdout(0.03, torch.Generator().manual_seed(0))
    rows = held.any(-1)[:, 0]  # (plane, row): held-out rows are a dead row shifted in Y only
    dy = {(r - (3 * s + 4)) % 48 for s, r in torch.nonzero(rows).tolist()}
    assert held.any() and len(dy) == 1


def test_holdout_planes_holds_a_large_hole_out_whole_in_another_plane():
    """For the choice of start, a large hole of one plane is copied whole, at its place, into a
    plane away from it and from the stack's ends; scattered defects, planes with nothing observed
    and images without a plane axis keep the tiled split alone (None)."""
    from napari_ngr.operators import Inpainting

    y = torch.rand((8, 1, 48, 48))
    obs = torch.ones(y.shape, dtype=torch.bool)
    obs[5, :, 4:44, 6:46] = False  # 69 % of plane 5
    obs[:, :, :, 20] = False  # and a dead column everywhere
    split, held = Inpainting(y * obs, obs).holdout_planes()
    planes = torch.nonzero(held.sum(dim=(1, 2, 3))).flatten().tolist()
    assert len(planes) == 1 and planes[0] not in (0, 4, 5, 6, 7)  # away from the hole and the ends
    p = planes[0]
    assert torch.equal(held[p, 0], ~obs[5, 0] & obs[p, 0])  # the hole's whole footprint, not tiles
    assert torch.equal(split.observed, obs & ~held) and split.planes_lost()
    scattered = torch.ones(y.shape, dtype=torch.bool)
    scattered[5] = torch.rand((1, 48, 48), generator=torch.Generator().manual_seed(0)) > 0.7  # 70 % pixels
    empty = torch.ones(y.shape, dtype=torch.bool)
    empty[5] = False  # a lost plane: every fill interpolates it alike
    rgb = torch.ones((1, 3, 48, 48), dtype=torch.bool)
    rgb[..., 4:44, 4:44] = False
    for o in (scattered, empty, rgb):
        assert Inpainting(torch.rand(o.shape) * o, o).holdout_planes() is None
    assert Inpainting(y * obs, obs, start="temporal").holdout_planes() is None


def test_stack_fill_interpolates_along_the_stack_and_falls_back_within_planes():
    from napari_ngr.operators import Inpainting

    S = 7
    ramp = torch.linspace(0.1, 0.9, S).reshape(S, 1, 1, 1) * torch.ones(S, 2, 10, 12)
    ramp[:, 1] *= 0.5
    obs = torch.ones(ramp.shape, dtype=torch.bool)
    obs[1:4, 0, 2:6, 3:9] = False  # three planes in a row: exact on a linear ramp
    obs[5:, 1] = False  # the end of the stack: a copy of the last observed plane
    obs[:, :, 8, 10] = False  # a whole pixel, every plane: the fill within the plane
    op = Inpainting(ramp * obs, obs, start="stack")
    out = op.initial_estimate()
    inner = ~obs.clone()
    inner[:, :, 8, 10] = False
    torch.testing.assert_close(out[1:4, 0][inner[1:4, 0]], ramp[1:4, 0][inner[1:4, 0]])
    torch.testing.assert_close(out[5:, 1, :8], ramp[4:5, 1, :8].expand(2, 8, 12))
    spatial = op.fill("biharmonic")
    torch.testing.assert_close(out[:, :, 8, 10], spatial[:, :, 8, 10])
    assert torch.equal(out[obs], ramp[obs])
    # start="auto" offers it where a plane lost most of itself (and more than twice the mean share)
    lost = torch.ones(ramp.shape, dtype=torch.bool)
    lost[3, :, 1:9, 1:10] = False  # 60 % of one plane
    assert Inpainting(ramp * lost, lost).planes_lost()
    assert set(Inpainting(ramp * lost, lost, start="auto").start_candidates()) == {"biharmonic", "dct", "nonlocal", "stack"}
    small = torch.ones(ramp.shape, dtype=torch.bool)
    small[1:4, 0, 2:6, 3:9] = False  # 10 % of three planes: no plane lost more than half
    assert not Inpainting(ramp * small, small).planes_lost()
    assert "stack" not in Inpainting(ramp * small, small, start="auto").start_candidates()
    every = lost.clone()
    every[:, :, 1:9, 1:10] = False  # every plane lost as much: the planes beside it lost it too
    assert not Inpainting(ramp * every, every).planes_lost()
    split, _ = Inpainting(ramp * lost, lost).holdout(0.03, torch.Generator().manual_seed(0))
    assert split.planes_lost()  # a split keeps the user's mask's answer


def test_dctn_cpu_fast_path_matches_torch_path():
    """On the CPU dctn/idctn use scipy's DCT; the torch FFT construction (other devices) agrees."""
    from napari_ngr._dct import dctn, idctn

    x = torch.randn(2, 3, 7, 10, dtype=torch.float64)
    fast = dctn(x, [1, 2, 3])
    slow = x
    for d in (1, 2, 3):
        slow = dct(slow, d)
    np.testing.assert_allclose(fast.numpy(), slow.numpy(), atol=1e-12)
    np.testing.assert_allclose(idctn(fast, [1, 2, 3]).numpy(), x.numpy(), atol=1e-12)


def _striped(cube, rng):
    y = cube + rng.normal(0, 0.02, cube.shape)
    cols = rng.choice(cube.shape[2], 8, replace=False)
    offs = rng.choice([-1, 1], 8) * rng.uniform(0.15, 0.3, 8)
    truth = np.zeros_like(cube)
    truth[3][:, cols] = offs
    return y + truth, truth


def test_estimate_stripes_finds_column_offsets_and_leaves_clean_planes(cube):
    from napari_ngr.operators import estimate_stripes

    rng = np.random.default_rng(0)
    y, truth = _striped(cube, rng)
    est = estimate_stripes(y[None].astype(np.float32))[0]
    err = est - truth
    assert np.sqrt(np.mean(err[3] ** 2)) < 0.25 * np.sqrt(np.mean(truth[3] ** 2))  # band 3: found
    clean = np.delete(np.arange(cube.shape[0]), 3)
    assert np.abs(est[clean]).max() < 0.05  # other bands: (almost) nothing subtracted


def test_find_dead_lines_ignores_constant_background(cube):
    from napari_ngr.operators import find_dead_lines

    y = cube + np.random.default_rng(1).normal(0, 0.02, cube.shape)
    y[2][:, 17] = 0.0  # a dead column
    y[5][:, :4] = 0.0  # zero padding: four constant columns side by side, the first next to a border
    dead = find_dead_lines(y[None])[0]
    assert dead[2][:, 17].all()
    assert dead.sum() == dead[2][:, 17].sum() + dead[5][:, 3].sum()  # only the column next to live data
    assert not dead[5][:, :3].any()


@pytest.mark.parametrize("w", [0.3, 1.0, 4.0])
def test_residual_factor_is_the_residual_variance_exact_gradients_leave(w):
    """The discrepancy rule's reference: with exact gradients of the clean image ``g``,
    ``x = (w + L)^-1 (w y + L g)`` leaves ``E||y - x||^2 = N sigma^2 residual_factor(w)``."""
    shape = (1, 3, 40, 36)
    weights = {1: 0.5, 2: 1.0, 3: 1.0}
    solver = GradientSolver(shape, weights, dtype=torch.float64)
    rng = np.random.default_rng(3)
    g = torch.from_numpy(rng.random(shape))
    lg = solver.divergence_term({d: forward_difference(g, d) for d in weights})  # L g
    sigma = 0.1
    ratios = []
    for _ in range(20):
        y = g + sigma * torch.from_numpy(rng.standard_normal(shape))
        x = solver.solve(w * y + lg, w)
        ratios.append(float(torch.mean((y - x) ** 2)) / sigma**2)
    factor = solver.residual_factor(w)
    assert 0.0 < factor < 1.0
    assert abs(np.mean(ratios) / factor - 1.0) < 0.03
    assert solver.residual_factor(10 * w) < factor  # a stronger data term keeps more noise in x


def test_noise_rms_matches_estimate_sigma_and_reads_shot_noise_at_its_rms():
    from skimage import data
    from skimage.restoration import estimate_sigma
    from skimage.transform import resize

    from napari_ngr.operators import noise_rms

    rng = np.random.default_rng(0)
    cam = resize(data.camera() / 255.0, (128, 128), anti_aliasing=True)
    y = cam + 0.1 * rng.standard_normal(cam.shape)
    assert noise_rms(y) == pytest.approx(estimate_sigma(y), rel=0.02)
    shot = rng.poisson(cam * 30) / 30.0  # variance cam / 30: grows with intensity
    rms = float(np.std(shot - cam))
    assert abs(noise_rms(shot) / rms - 1) < 0.05
    assert estimate_sigma(shot) < 0.9 * rms  # the global median reads a lower level
    assert noise_rms(np.zeros((16, 16))) == 0.0 and noise_rms(rng.normal(0, 1, (5, 7))) > 0


def _nl_means_stack_direct(x, sigma, patch, search, planes, h, self_weight=0.0):
    """Leave-one-out stack NL-means written out entry by entry (the definition); with
    ``self_weight`` the entry's own value gets that weight. Returns ``(result, weight sums of the
    other entries)``."""
    S, C, H, W = x.shape
    p = patch // 2
    xp = np.pad(x, ((0, 0), (0, 0), (search + p,) * 2, (search + p,) * 2), mode="reflect")
    out = np.empty_like(x)
    sums = np.empty((S, 1, H, W))
    for s in range(S):
        for i in range(H):
            for j in range(W):
                ci, cj = i + search + p, j + search + p
                ref = xp[s, :, ci - p:ci + p + 1, cj - p:cj + p + 1]
                num, den = np.zeros(C), 0.0
                for t in range(max(0, s - planes), min(S, s + planes + 1)):
                    for dy in range(-search, search + 1):
                        for dx in range(-search, search + 1):
                            oth = xp[t, :, ci + dy - p:ci + dy + p + 1, cj + dx - p:cj + dx + p + 1]
                            if (t, dy, dx) == (s, 0, 0):
                                continue  # leave-one-out: the entry's own value has no weight
                            d = np.mean((ref - oth) ** 2)
                            wgt = np.exp(min(2 * sigma**2 - d, 0) / (h * sigma) ** 2)
                            num += wgt * xp[t, :, ci + dy, cj + dx]
                            den += wgt
                out[s, :, i, j] = (num + self_weight * xp[s, :, ci, cj]) / (den + self_weight)
                sums[s, 0, i, j] = den
    return out, sums


def test_nl_means_stack_matches_its_definition():
    from napari_ngr.operators import nl_means_stack

    x = np.random.default_rng(3).random((3, 2, 7, 9)).astype(np.float32)
    got = nl_means_stack(torch.from_numpy(x), 0.2, patch_size=3, patch_distance=2, plane_distance=1, h=0.6)
    ref, sums = _nl_means_stack_direct(x.astype(np.float64), 0.2, 3, 2, 1, 0.6)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
    # With a weight on the entry's own value (as skimage's NL-means), and the other weights' sums.
    own, wsum = nl_means_stack(torch.from_numpy(x), 0.2, patch_size=3, patch_distance=2, plane_distance=1,
                               h=0.6, self_weight=1.0, return_weight_sum=True)
    ref_own, ref_sums = _nl_means_stack_direct(x.astype(np.float64), 0.2, 3, 2, 1, 0.6, self_weight=1.0)
    np.testing.assert_allclose(own.numpy(), ref_own, atol=1e-5)
    np.testing.assert_allclose(wsum.numpy(), ref_sums, rtol=1e-5)
    np.testing.assert_allclose(ref_sums, sums)
    assert np.abs(own.numpy() - got.numpy()).max() > 1e-3
    # Blocks of output planes (bounded work space on large stacks) give the same result.
    for block in (1, 2 * 7 * 9 * 2):
        blocked = nl_means_stack(torch.from_numpy(x), 0.2, patch_size=3, patch_distance=2, plane_distance=1,
                                 h=0.6, block=block)
        np.testing.assert_allclose(blocked.numpy(), got.numpy(), atol=1e-6)


def test_nl_means_stack_finds_moving_structure_in_neighbouring_planes(moving_board):
    """On a pattern that moves between frames, matching patches in the neighbouring planes
    beats matching within each plane by more than 3 dB."""
    from conftest import psnr
    from napari_ngr.operators import nl_means_stack

    board, noisy = moving_board
    y = torch.from_numpy(noisy)[:, None]
    own = nl_means_stack(y, 0.1, plane_distance=0, h=0.8).numpy()[:, 0]
    across = nl_means_stack(y, 0.1).numpy()[:, 0]
    assert psnr(board, own) > psnr(board, noisy) + 4
    assert psnr(board, across) > psnr(board, own) + 3
    assert across.dtype == np.float32 and across.shape == noisy.shape


def test_nl_means_stack_weighted_on_a_guide_leaves_each_entry_out(moving_board):
    """With a guide the patches are compared on it, the values averaged are the input's and an
    entry's own value still gets no weight: changing it changes its neighbours' output only. A
    noise-free guide (the board) beats plain NL-means by more than 1 dB (measured: 1.3 dB; the
    6 px squares repeat only every 12 px in a plane, so few patches match exactly)."""
    from conftest import psnr
    from napari_ngr.operators import nl_means_stack

    board, noisy = moving_board
    y = torch.from_numpy(noisy)[:, None]
    guide = torch.from_numpy(board.astype(np.float32))[:, None]
    plain = nl_means_stack(y, 0.1).numpy()[:, 0]
    guided = nl_means_stack(y, 0.1, h=0.45, guide=guide)
    assert psnr(board, guided.numpy()[:, 0]) > psnr(board, plain) + 1
    several = nl_means_stack(y, 0.1, h=(0.3, 0.45), guide=guide)  # one pass, a result per h
    assert torch.equal(several[1], guided) and torch.equal(several[0], nl_means_stack(y, 0.1, h=0.3, guide=guide))
    y2 = y.clone()
    y2[2, 0, 20, 20] += 5.0
    again = nl_means_stack(y2, 0.1, h=0.45, guide=guide)
    assert again[2, 0, 20, 20] == guided[2, 0, 20, 20]  # its own value: no weight
    changed = (again != guided)[:, 0]
    assert changed.sum() > 10 and not changed[2, 20, 20]


def test_block_match_across_planes_and_in_batches():
    """Matching in neighbouring planes returns flat indices into the candidate planes, the
    reference first; holding the distances in batches of offsets (bounded memory) gives the
    same groups."""
    from napari_ngr.operators import _block_match

    x = torch.from_numpy(np.random.default_rng(0).random((3, 1, 30, 33)).astype(np.float32))
    one = _block_match(x[1], 8, 3, 5, 12)
    assert torch.equal(_block_match(x[1], 8, 3, 5, 12, max_work=1000), one)  # 1000 // 100 refs: batches of 12
    across = _block_match(x[1], 8, 3, 5, 12, candidates=x, ref=1)
    assert torch.equal(_block_match(x[1], 8, 3, 5, 12, candidates=x, ref=1, max_work=1000), across)
    assert across.shape == one.shape and across.max() < 3 * 30 * 33
    plane = across // (30 * 33)
    assert torch.equal(across[:, 0] - 30 * 33, one[:, 0])  # the reference, in plane 1, comes first
    assert set(plane.unique().tolist()) == {0, 1, 2}  # noise: similar patches in every plane
    # a plane repeated: its copy's patch at the same place is the best match after the reference
    rep = torch.stack([x[1], x[1]])
    dup = _block_match(x[1], 8, 3, 5, 12, candidates=rep, ref=0)
    assert torch.equal(dup[:, 1], dup[:, 0] + 30 * 33)


def test_block_match_matches_its_definition():
    """Each group holds the reference (first) and the patches at the smallest summed squared
    distance over the patch and the channels, searched within ``search`` px in every candidate
    plane (brute force over all offsets); the row of horizontal offsets done one at a time
    (``row_work``: a large image's work space) gives the same groups. Odd sizes: the last row and
    column of references lie off the grid of ``step``."""
    from napari_ngr.operators import _block_match

    P, C, H, W, p, step, R, K = 2, 2, 13, 17, 4, 3, 3, 7
    x = torch.from_numpy(np.random.default_rng(5).random((P, C, H, W)).astype(np.float32))
    got = _block_match(x[1], p, step, R, K, candidates=x, ref=1)
    assert torch.equal(_block_match(x[1], p, step, R, K, candidates=x, ref=1, row_work=1), got)
    ys, xs = [0, 3, 6, 9], [0, 3, 6, 9, 12, 13]  # H - p = 9 on the grid, W - p = 13 off it
    assert got.shape == (len(ys) * len(xs), K)
    xn = x.double().numpy()
    for n, (y0, x0) in enumerate((a, b) for a in ys for b in xs):
        dist = {}
        for t in range(P):
            for yy in range(max(0, y0 - R), min(H - p, y0 + R) + 1):
                for xx in range(max(0, x0 - R), min(W - p, x0 + R) + 1):
                    dist[t * H * W + yy * W + xx] = float(((xn[1, :, y0:y0 + p, x0:x0 + p]
                                                            - xn[t, :, yy:yy + p, xx:xx + p]) ** 2).sum())
        ref = H * W + y0 * W + x0
        assert int(got[n, 0]) == ref
        best = sorted(v for k, v in dist.items() if k != ref)[:K - 1]
        np.testing.assert_allclose(sorted(dist[int(k)] for k in got[n, 1:]), best, rtol=1e-5)


def test_nl_means_stack_weights_by_squaring_where_h_halves_per_step():
    """``h`` a factor sqrt(2) apart (the fallback's :data:`GUIDED_H`): each weight is the square of
    the next one's instead of a new exponential; the results equal separate calls."""
    from napari_ngr.operators import nl_means_stack
    from napari_ngr.solver import GUIDED_H

    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.random((3, 2, 12, 15)).astype(np.float32))
    g = torch.from_numpy(rng.random((3, 2, 12, 15)).astype(np.float32))
    assert all(abs((a / b) ** 2 - 0.5) < 1e-9 for a, b in zip(GUIDED_H, GUIDED_H[1:]))
    together = nl_means_stack(x, 0.2, h=GUIDED_H, guide=g)
    for h, t in zip(GUIDED_H, together):
        torch.testing.assert_close(t, nl_means_stack(x, 0.2, h=h, guide=g), rtol=1e-5, atol=1e-6)


def test_low_rank_denoise_across_planes_beats_within_planes(moving_board):
    """On a pattern moving between frames, groups matched in the two planes on either side beat
    groups within each plane; ``plane_distance=0`` is the per-plane filter."""
    from conftest import psnr
    from napari_ngr.operators import low_rank_denoise, nl_means_stack

    board, noisy = moving_board
    y = torch.from_numpy(noisy)[:, None]
    pilot = nl_means_stack(y, 0.1)
    own = low_rank_denoise(y, 0.1, guide=pilot)
    assert torch.equal(own[3:4], low_rank_denoise(y[3:4], 0.1, guide=pilot[3:4]))
    across = low_rank_denoise(y, 0.1, guide=pilot, plane_distance=2)
    assert psnr(board, across.numpy()[:, 0]) > psnr(board, own.numpy()[:, 0]) + 0.5
    assert psnr(board, across.numpy()[:, 0]) > psnr(board, noisy) + 8
    assert torch.equal(across, low_rank_denoise(y, 0.1, guide=pilot, plane_distance=2))


def test_dct_fill_keeps_observed_entries_and_restores_texture_biharmonic_smooths(brick96):
    """The sparse block-DCT fill re-inserts every observed entry, is deterministic, and on
    regular texture beats the biharmonic fill it starts from by more than 2 dB on the missing
    entries (measured: +4.4 dB on this crop)."""
    from conftest import psnr
    from napari_ngr.operators import Inpainting, dct_fill

    img, obs = brick96
    y = torch.from_numpy(np.where(obs, img, 0.0)[None, None].astype(np.float32))
    o = torch.from_numpy(obs)[None, None]
    bh = Inpainting(y, o, start="biharmonic").initial_estimate()
    filled = dct_fill(y, o, bh)
    assert filled.shape == y.shape and filled.dtype == torch.float32
    np.testing.assert_array_equal(filled.numpy()[0, 0][obs], y.numpy()[0, 0][obs])
    assert psnr(img, filled.numpy()[0, 0], ~obs) > psnr(img, bh.numpy()[0, 0], ~obs) + 2
    assert torch.equal(dct_fill(y, o, bh), filled)
    # Channels: an RGB image with different masks per channel uses the other channels' entries.
    rgb = np.stack([img, 0.8 * img + 0.1, 0.6 * img + 0.2])
    obs3 = np.random.default_rng(1).random(rgb.shape) < 0.3
    y3 = torch.from_numpy(np.where(obs3, rgb, 0.0)[None].astype(np.float32))
    o3 = torch.from_numpy(obs3)[None]
    bh3 = Inpainting(y3, o3, start="biharmonic").initial_estimate()
    assert psnr(rgb, dct_fill(y3, o3, bh3).numpy()[0], ~obs3) > psnr(rgb, bh3.numpy()[0], ~obs3) + 2


def test_dct_fill_iteration_matches_its_definition():
    """One iteration: every 8 x 8 block of every shifted grid (reflected borders) transformed by
    the 3-D orthonormal DCT (the blocks', and across the channels), coefficients at or below the
    threshold set to zero except the blocks' means, transformed back, the grids averaged and the
    observed entries re-inserted; written out block by block with scipy."""
    import scipy.fft

    from napari_ngr.operators import dct_fill

    rng = np.random.default_rng(4)
    S, C, H, W, b, t = 2, 3, 13, 18, 8, 0.3
    y = rng.random((S, C, H, W)).astype(np.float32)
    obs = rng.random((S, 1, H, W)) < 0.5
    start = rng.random((S, C, H, W)).astype(np.float32)
    got = dct_fill(torch.from_numpy(y), torch.from_numpy(obs), torch.from_numpy(start), iterations=1,
                   thresholds=(t, t), seed=7).numpy()
    off = torch.randint(0, 4, (2,), generator=torch.Generator().manual_seed(7)).tolist()
    x = np.where(obs, y, start).astype(np.float64)
    xp = np.pad(x, ((0, 0), (0, 0), (b, b), (b, b)), mode="reflect")
    acc = np.zeros_like(x)
    for gy in (0, 4):
        for gx in (0, 4):
            dy, dx = gy + off[0], gx + off[1]
            out = np.zeros((S, C, H + 2 * b, W + 2 * b))
            for s in range(S):
                for i in range(b - dy, b + H, b):  # blocks covering the image, grid shifted by dy, dx
                    for j in range(b - dx, b + W, b):
                        c = scipy.fft.dctn(xp[s, :, i:i + b, j:j + b], norm="ortho")
                        keep = np.abs(c) > t
                        keep[:, 0, 0] = True  # the blocks' means (every channel-DCT component)
                        out[s, :, i:i + b, j:j + b] = scipy.fft.idctn(c * keep, norm="ortho")
            acc += out[:, :, b:b + H, b:b + W]
    want = np.where(obs, y, acc / 4)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_nonlocal_fill_keeps_observed_entries_and_beats_the_dct_fill_on_a_photo():
    """The patch-group fill re-inserts every observed entry, is deterministic, and on a natural
    RGB crop (30 % of pixels observed) beats the block-DCT fill it starts from on the missing
    entries (measured: 28.00 against 26.00 dB, biharmonic 25.16)."""
    from conftest import psnr
    from skimage import data
    from skimage.transform import resize

    from napari_ngr.operators import Inpainting, dct_fill, nonlocal_fill

    g = resize(data.astronaut(), (256, 256), anti_aliasing=True)[64:128, 96:160].transpose(2, 0, 1)
    obs = np.random.default_rng(2).random(g.shape[1:]) < 0.3
    y = torch.from_numpy(np.where(obs, g, 0.0)[None].astype(np.float32))
    o = torch.from_numpy(obs)[None, None]
    miss = np.broadcast_to(~obs, g.shape)
    d = dct_fill(y, o, Inpainting(y, o, start="biharmonic").initial_estimate())
    filled = nonlocal_fill(y, o, d)
    assert filled.shape == y.shape and filled.dtype == torch.float32
    np.testing.assert_array_equal(filled.numpy()[0][:, obs], y.numpy()[0][:, obs])
    assert psnr(g, filled.numpy()[0], miss) > psnr(g, d.numpy()[0], miss) + 1.0
    assert torch.equal(nonlocal_fill(y, o, d), filled)
    assert torch.equal(nonlocal_fill(y, o, d, split=False), filled)  # whole pixels: colour groups


def test_nonlocal_fill_splits_colour_components_where_channels_are_missing_apart():
    """Where entries are missing channel by channel, the fill groups luminance and colour
    differences apart (``split=None`` decides from the mask), which recovers a missing channel
    from the observed ones; colour patches grouped whole do not (measured on an RGB crop, 30 % of
    entries observed: 33.26 dB split, 29.49 whole, block-DCT fill 31.55)."""
    from conftest import psnr
    from skimage import data
    from skimage.transform import resize

    from napari_ngr.operators import Inpainting, dct_fill, nonlocal_fill

    g = resize(data.astronaut(), (256, 256), anti_aliasing=True)[64:128, 96:160].transpose(2, 0, 1)
    obs = np.random.default_rng(2).random(g.shape) < 0.3
    y = torch.from_numpy(np.where(obs, g, 0.0)[None].astype(np.float32))
    o = torch.from_numpy(obs)[None]
    d = dct_fill(y, o, Inpainting(y, o, start="biharmonic").initial_estimate())
    auto = nonlocal_fill(y, o, d)
    assert torch.equal(auto, nonlocal_fill(y, o, d, split=True))
    np.testing.assert_array_equal(auto.numpy()[0][obs], y.numpy()[0][obs])
    whole = nonlocal_fill(y, o, d, split=False)
    assert psnr(g, auto.numpy()[0], ~obs) > psnr(g, whole.numpy()[0], ~obs) + 2
    assert psnr(g, auto.numpy()[0], ~obs) > psnr(g, d.numpy()[0], ~obs) + 1


def test_nonlocal_fill_leaves_what_it_cannot_group():
    """Planes smaller than a patch, and more than 16 channels, keep the start (observed entries
    re-inserted); a 9 x 9 plane (one candidate row of patches) still works."""
    from napari_ngr.operators import nonlocal_fill

    rng = np.random.default_rng(0)
    for shape in ((2, 1, 5, 6), (1, 20, 16, 16)):
        y = torch.from_numpy(rng.random(shape).astype(np.float32))
        o = torch.from_numpy(rng.random(shape) < 0.5)
        start = torch.full_like(y, 0.5)
        assert torch.equal(nonlocal_fill(y, o, start), torch.where(o, y, start))
    y = torch.from_numpy(rng.random((1, 3, 9, 9)).astype(np.float32))
    o = torch.from_numpy(rng.random((1, 1, 9, 9)) < 0.5)
    out = nonlocal_fill(y, o, torch.full_like(y, 0.5))
    assert bool(torch.isfinite(out).all()) and torch.equal(out[o.expand_as(y)], y[o.expand_as(y)])


def test_dct_fill_handles_planes_smaller_than_a_block():
    from napari_ngr.operators import dct_fill

    y = torch.from_numpy(np.random.default_rng(0).random((2, 1, 5, 6)).astype(np.float32))
    o = torch.ones_like(y, dtype=torch.bool)
    o[:, :, 2, 3] = False
    out = dct_fill(y, o, torch.where(o, y, torch.full_like(y, 0.5)))
    assert out.shape == y.shape and bool(torch.isfinite(out).all())
    assert torch.equal(out[o], y[o])
    assert float(out[:, :, 2, 3].min()) >= 0.0 and float(out[:, :, 2, 3].max()) <= 1.0


def test_nonlocal_fill_survives_nearly_flat_groups():
    """Groups of nearly identical patches give Gram matrices of about 1e-18, on which LAPACK's
    float32 eigh can fail to converge or return NaN. It failed on this 64 x 64 crop of the demo's
    uint8 photo with its painted scratches at d8c6d36; the fill must stay finite there, and on a
    synthetic flat half, which must stay flat."""
    import sys
    from pathlib import Path

    from skimage import data
    from skimage.transform import resize

    from napari_ngr.operators import Inpainting, nonlocal_fill

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_data"))
    from demo import scratch_mask

    clean = (resize(data.astronaut(), (256, 256), anti_aliasing=True) * 255).astype(np.uint8)
    miss = scratch_mask(clean.shape[:2])[96:160, 192:256]
    crop = clean[96:160, 192:256].astype(np.float32) / 255
    y = torch.from_numpy(np.where(miss[..., None], 0, crop).transpose(2, 0, 1)[None].copy())
    o = torch.from_numpy(~miss)[None, None]
    out = nonlocal_fill(y, o, Inpainting(y, o, start="dct").initial_estimate())
    assert bool(torch.isfinite(out).all())

    rng = np.random.default_rng(0)
    img = np.full((3, 48, 48), 0.5) + 1e-9 * rng.random((3, 48, 48))
    img[:, :, 24:] = rng.random((3, 48, 24))
    obs = rng.random((48, 48)) < 0.3
    y = torch.from_numpy(np.where(obs, img, 0.0)[None].astype(np.float32))
    o = torch.from_numpy(obs)[None, None]
    out = nonlocal_fill(y, o, torch.full_like(y, 0.5))
    assert bool(torch.isfinite(out).all())
    assert float((out[0, :, :, :20] - 0.5).abs().max()) < 1e-3  # the flat half stays flat


def test_low_rank_denoise_beats_nl_means_on_a_photo_and_is_deterministic():
    """The prefilter of single-image Gaussian denoising: on a 64 x 64 RGB crop at sigma = 0.1
    and 0.2, groups of similar patches (matched on the NL-means) reduced to their components
    above the noise's beat the NL-means they were matched on (measured: 29.78 / 27.14 dB and
    25.45 / 22.78), grouping luminance and colour differences apart (the default for colour)
    beats whole colour patches, and the result is deterministic."""
    from conftest import psnr
    from skimage import data

    from napari_ngr.operators import low_rank_denoise, nl_means_planes

    gt = (data.astronaut()[100:228:2, 50:178:2] / 255.0).transpose(2, 0, 1)[None]
    for sigma, margin in ((0.1, 1.5), (0.2, 1.5)):
        y = torch.from_numpy((gt + np.random.default_rng(0).normal(0, sigma, gt.shape)).astype(np.float32))
        nlm = nl_means_planes(y, sigma)
        out = low_rank_denoise(y, sigma, guide=nlm)
        assert out.shape == y.shape and out.dtype == torch.float32
        assert psnr(gt, out.numpy()) > psnr(gt, nlm.numpy()) + margin, sigma
        assert torch.equal(out, low_rank_denoise(y, sigma, guide=nlm, split=True))
        assert torch.equal(out, low_rank_denoise(y, sigma, guide=nlm))
        whole = low_rank_denoise(y, sigma, guide=nlm, split=False)
        assert psnr(gt, out.numpy()) > psnr(gt, whole.numpy()) + 0.5, sigma


def test_low_rank_denoise_flattens_pure_noise_and_leaves_tiny_planes():
    """On a flat image the groups have no component above the noise's: the result is the flat
    value, within a small fraction of sigma; planes smaller than a patch are returned as they are."""
    from napari_ngr.operators import low_rank_denoise

    rng = np.random.default_rng(1)
    y = torch.from_numpy((0.5 + 0.1 * rng.standard_normal((2, 1, 48, 40))).astype(np.float32))
    out = low_rank_denoise(y, 0.1)
    assert float((out - 0.5).std()) < 0.02 and abs(float(out.mean()) - 0.5) < 0.01
    tiny = torch.from_numpy(rng.random((1, 3, 6, 30)).astype(np.float32))
    assert torch.equal(low_rank_denoise(tiny, 0.1), tiny)


def test_patch_group_filters_run_on_the_cpu_for_devices_without_float64(monkeypatch):
    """On MPS (no float64, no batched eigh) the patch-group filters run on the CPU and their
    results go back to the input's device. Without an Apple GPU here, the CPU stands in for MPS:
    the moving branch must give the same results, single tensors and lists alike."""
    from napari_ngr import operators

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((3, 1, 24, 24)).astype(np.float32))
    direct = operators.low_rank_denoise(x, 0.1, plane_distance=1), operators.nl_means_stack(x, 0.1, h=(0.3, 0.6))
    monkeypatch.setattr(operators, "_CPU_ONLY_DEVICES", ("cpu",))
    moved = operators.low_rank_denoise(x, 0.1, plane_distance=1), operators.nl_means_stack(x, 0.1, h=(0.3, 0.6))
    assert torch.equal(direct[0], moved[0])
    assert isinstance(moved[1], list) and all(torch.equal(a, b) for a, b in zip(direct[1], moved[1]))
    for fn in (operators.dct_fill, operators.nonlocal_fill, operators.low_rank_denoise, operators.nl_means_stack):
        assert fn.__wrapped__ is not None and fn.__doc__  # wrapped, documentation kept


def test_fill_empty_planes_interpolates_along_the_stack_then_the_channels():
    from napari_ngr.operators import _fill_empty_planes

    S, C = 5, 3
    x = np.arange(S * C, dtype=np.float64).reshape(S, C, 1, 1) * np.ones((1, 1, 2, 3))
    obs = np.ones(x.shape, bool)
    obs[1, 0] = obs[2, 0] = False  # two planes in a row: 1/3 and 2/3 of the way
    obs[4, 1] = False  # the last plane: a copy of the nearest one
    obs[:, 2] = False  # a channel with no data anywhere: from the other channels of each plane
    obs[0, 1, 0, 0] = False  # a partly observed plane is not touched
    for out in (np.where(obs, x, -1.0), torch.from_numpy(np.where(obs, x, -1.0))):
        _fill_empty_planes(out, obs if isinstance(out, np.ndarray) else torch.from_numpy(obs))
        out = np.asarray(out)
        np.testing.assert_allclose(out[1, 0], x[0, 0] + (x[3, 0] - x[0, 0]) / 3)
        np.testing.assert_allclose(out[2, 0], x[0, 0] + 2 * (x[3, 0] - x[0, 0]) / 3)
        np.testing.assert_allclose(out[4, 1], out[3, 1])
        np.testing.assert_allclose(out[3, 2], out[3, 1])  # nearest channel with data: C = 1
        assert out[0, 1, 0, 0] == -1.0
    only = np.zeros((1, 1, 2, 2), bool)
    z = np.full((1, 1, 2, 2), 7.0)
    _fill_empty_planes(z, only)  # nothing observed anywhere: zeros, not NaN
    assert np.all(z == 0.0)


def test_a_spectrum_interpolates_and_holds_out_along_its_bands():
    """More than 4 channels are bands: a band that lost most of itself is offered the fill along
    the bands and held out in another band; a colour image's channels are not."""
    from napari_ngr.operators import Inpainting

    B = 8
    ramp = torch.linspace(0.1, 0.8, B).reshape(1, B, 1, 1) * torch.ones(1, B, 40, 40)
    obs = torch.ones(ramp.shape, dtype=torch.bool)
    obs[0, 3, 2:36, 4:38] = False  # 72 % of band 3
    op = Inpainting(ramp * obs, obs, start="auto")
    assert op.plane_axis() == 1 and op.planes_lost()
    fills = op.start_candidates()
    torch.testing.assert_close(fills["stack"], ramp)  # exact between bands 2 and 4 of a linear ramp
    for seed in range(3):
        _, held = op.holdout(0.03, torch.Generator().manual_seed(seed))
        bands = held.sum(dim=(0, 2, 3))
        assert held.any() and int(bands[3]) == 0 and int((bands > 0).sum()) == 1
    rgb = Inpainting(ramp[:, :3] * obs[:, :3], obs[:, :3], start="auto")
    assert rgb.plane_axis() is None and not rgb.planes_lost() and "stack" not in rgb.start_candidates()
