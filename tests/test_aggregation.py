"""Numerical cores of the strategies: FedAvg, FedProx, SCAFFOLD, FedAdam/FedYogi, FedBN.

Float64 throughout unless a test is about another dtype; "exact" means to 1e-12.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from fedseg.errors import AggregationError, ConfigError, FedsegError
from fedseg.strategies import aggregate
from fedseg.strategies.aggregate import apply_delta, fedavg, weighted_sum
from fedseg.strategies.fedbn import is_norm_key, merge, norm_keys_of_module, split_local
from fedseg.strategies.fedopt import fedadagrad_step, fedadam_step, fedavgm_step, fedyogi_step
from fedseg.strategies.fedprox import proximal_term
from fedseg.strategies.scaffold import (
    apply_scaffold_correction,
    scaffold_correction,
    server_update,
    site_control_update,
)

TOL = 1e-12
SHAPES = [(3, 4), (5,), (), (0,), (2, 3, 4)]


def _random_updates(rng: np.random.Generator, k: int, dtype=np.float64) -> list[list[np.ndarray]]:
    return [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(k)]


def _assert_close(actual: list[np.ndarray], expected: list[np.ndarray], tol: float = TOL) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == np.shape(e)
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol)


@pytest.fixture(params=["default-blocks", "tiny-blocks", "tiny-blocks-3-threads"])
def block_bytes(request, monkeypatch):
    """Run FedAvg tests with the real block size, with 64-byte blocks (many blocks), and with
    64-byte blocks shared by 3 threads (the path large updates take)."""
    if request.param != "default-blocks":
        monkeypatch.setattr(aggregate, "_BLOCK_BYTES", 64)
    if request.param == "tiny-blocks-3-threads":
        monkeypatch.setattr(aggregate, "_PARALLEL_MIN_ELEMENTS", 1)
        monkeypatch.setattr(aggregate, "default_threads", lambda: 3)
    return request.param


# --------------------------------------------------------------------------------------- FedAvg


def test_fedavg_hand_computed_three_vectors(block_bytes):
    # Prepare
    updates = [
        [np.array([1.0, 2.0, 3.0])],
        [np.array([4.0, 5.0, 6.0])],
        [np.array([7.0, 8.0, 9.0])],
    ]
    weights = [1, 2, 3]  # case counts
    # Execute
    result = fedavg(updates, weights)
    # Assert: (1*[1,2,3] + 2*[4,5,6] + 3*[7,8,9]) / 6 = [30, 36, 42] / 6
    _assert_close(result, [np.array([5.0, 6.0, 7.0])])
    assert result[0].dtype == np.float64


def test_fedavg_matches_np_average_with_case_counts(block_bytes):
    rng = np.random.default_rng(0)
    updates = _random_updates(rng, 7)
    counts = [int(c) for c in rng.integers(1, 200, size=7)]
    result = fedavg(updates, counts)
    expected = [
        np.average(np.stack([u[j] for u in updates]), axis=0, weights=counts)
        for j in range(len(SHAPES))
    ]
    _assert_close(result, expected)


def test_fedavg_is_permutation_invariant(block_bytes):
    rng = np.random.default_rng(1)
    updates = _random_updates(rng, 5)
    counts = [3, 10, 1, 7, 22]
    order = [3, 0, 4, 2, 1]
    result = fedavg(updates, counts)
    permuted = fedavg([updates[i] for i in order], [counts[i] for i in order])
    _assert_close(permuted, result)


def test_fedavg_of_identical_inputs_returns_that_input(block_bytes):
    rng = np.random.default_rng(2)
    update = _random_updates(rng, 1)[0]
    result = fedavg([update] * 4, [5, 1, 9, 2])
    _assert_close(result, update, tol=1e-15)


def test_fedavg_scaled_weights_change_nothing(block_bytes):
    rng = np.random.default_rng(3)
    updates = _random_updates(rng, 4)
    counts = [4, 8, 15, 16]
    result = fedavg(updates, counts)
    for factor in (1e-6, 3.0, 1e9):
        _assert_close(fedavg(updates, [c * factor for c in counts]), result)


def test_fedavg_huge_and_tiny_weights():
    updates = [[np.array([1.0])], [np.array([3.0])]]
    _assert_close(fedavg(updates, [1e308, 1e308]), [np.array([2.0])])
    _assert_close(fedavg(updates, [5e-324, 5e-324]), [np.array([2.0])])


def test_fedavg_single_update_is_a_copy():
    update = [np.array([1.0, -2.0]), np.ones((2, 2))]
    result = fedavg([update], [17])
    _assert_close(result, update, tol=0.0)
    assert not any(np.shares_memory(r, u) for r, u in zip(result, update, strict=True))


def test_fedavg_leaves_inputs_untouched():
    rng = np.random.default_rng(4)
    updates = _random_updates(rng, 3)
    before = [[a.copy() for a in u] for u in updates]
    fedavg(updates, [1, 2, 3])
    for u, b in zip(updates, before, strict=True):
        _assert_close(u, b, tol=0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_fedavg_keeps_dtype_within_documented_rounding_bound(dtype, block_bytes):
    # |result - exact| <= (K + 1) * u * sum_k |w_k x_k|, u the unit roundoff of the dtype
    rng = np.random.default_rng(5)
    k = 10
    updates = _random_updates(rng, k, dtype=dtype)
    counts = [int(c) for c in rng.integers(1, 100, size=k)]
    result = fedavg(updates, counts)
    factors = np.array(counts, dtype=np.float64) / sum(counts)
    u = np.finfo(dtype).eps / 2
    for j in range(len(SHAPES)):
        stacked = np.stack([up[j].astype(np.float64) for up in updates])
        exact = np.tensordot(factors, stacked, axes=1)
        bound = (k + 1) * u * np.tensordot(factors, np.abs(stacked), axes=1)
        assert result[j].dtype == dtype
        assert np.all(np.abs(result[j].astype(np.float64) - exact) <= bound)


def test_fedavg_mixed_dtypes_promote():
    updates = [[np.array([1.0, 2.0], dtype=np.float32)], [np.array([3.0, 4.0], dtype=np.float64)]]
    result = fedavg(updates, [1, 1])
    assert result[0].dtype == np.float64
    _assert_close(result, [np.array([2.0, 3.0])])


def test_fedavg_non_contiguous_inputs(block_bytes):
    rng = np.random.default_rng(6)
    base = [rng.standard_normal((4, 6)) for _ in range(3)]
    fortran = [[np.asfortranarray(b)] for b in base]
    strided = [[np.repeat(b, 2, axis=1)[:, ::2]] for b in base]
    expected = [np.average(np.stack(base), axis=0, weights=[1, 2, 3])]
    _assert_close(fedavg(fortran, [1, 2, 3]), expected)
    _assert_close(fedavg(strided, [1, 2, 3]), expected)
    # 1-D strided views stay strided after reshape(-1): the BLAS call must not see raw memory.
    flat = [np.repeat(b.reshape(-1), 3)[::3] for b in base]
    _assert_close(fedavg([[f] for f in flat], [1, 2, 3]), [expected[0].reshape(-1)])


def test_fedavg_writes_into_out():
    updates = [[np.array([1.0, 3.0])], [np.array([3.0, 5.0])]]
    out = [np.empty(2)]
    result = fedavg(updates, [1, 1], out=out)
    assert result[0] is out[0]
    _assert_close(out, [np.array([2.0, 4.0])])


@pytest.mark.parametrize("threads", [1, 2, None])
def test_fedavg_threads_stay_within_the_rounding_bound(threads):
    rng = np.random.default_rng(11)
    updates = [[rng.standard_normal(50_000).astype(np.float32)] for _ in range(3)]
    factors = np.array([1, 2, 3]) / 6
    stacked = np.stack([u[0].astype(np.float64) for u in updates])
    bound = 4 * (np.finfo(np.float32).eps / 2) * np.tensordot(factors, np.abs(stacked), axes=1)
    result = fedavg(updates, [1, 2, 3], threads=threads)[0]
    assert np.all(np.abs(result - np.tensordot(factors, stacked, axes=1)) <= bound)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fedavg_is_bit_identical_for_every_thread_count(dtype, monkeypatch):
    monkeypatch.setattr(aggregate, "_BLOCK_BYTES", 4096)
    rng = np.random.default_rng(12)
    updates = [
        [rng.standard_normal(s).astype(dtype) for s in [(70, 53), (5,), (3001,)]] for _ in range(6)
    ]
    counts = [3, 1, 4, 1, 5, 9]
    reference = fedavg(updates, counts, threads=1)
    for threads in (2, 3, 4, 7):
        result = fedavg(updates, counts, threads=threads)
        for r, e in zip(result, reference, strict=True):
            np.testing.assert_array_equal(r, e)


def _record_threads(monkeypatch) -> set[int]:
    """Replace the float32 axpy with a wrapper that records which threads call it."""
    seen: set[int] = set()
    kernel = aggregate._BLAS_AXPY[np.dtype(np.float32)]

    def spy(x, y, a):
        seen.add(threading.get_ident())
        kernel(x, y, a)

    monkeypatch.setitem(aggregate._BLAS_AXPY, np.dtype(np.float32), spy)
    return seen


def test_fedavg_shares_large_updates_between_threads(monkeypatch):
    monkeypatch.setattr(aggregate, "default_threads", lambda: 2)
    seen = _record_threads(monkeypatch)
    updates = [[np.full(aggregate._PARALLEL_MIN_ELEMENTS, float(i), np.float32)] for i in range(3)]
    result = fedavg(updates, [1, 1, 2])
    np.testing.assert_array_equal(result[0], np.full(aggregate._PARALLEL_MIN_ELEMENTS, 1.25))
    assert len(seen) == 2
    assert threading.get_ident() in seen  # the caller takes one share


def test_fedavg_keeps_small_updates_on_the_calling_thread(monkeypatch):
    monkeypatch.setattr(aggregate, "default_threads", lambda: 4)
    seen = _record_threads(monkeypatch)
    updates = [[np.ones(1000, np.float32), np.ones((30, 30), np.float32)] for _ in range(3)]
    fedavg(updates, [1, 2, 3])
    assert seen == {threading.get_ident()}


def test_fedavg_passes_a_worker_thread_error_to_the_caller(monkeypatch):
    monkeypatch.setattr(aggregate, "_BLOCK_BYTES", 64)

    def broken(x, y, a):
        raise RuntimeError("kernel failed")

    monkeypatch.setitem(aggregate._BLAS_AXPY, np.dtype(np.float32), broken)
    updates = [[np.ones(1000, np.float32)] for _ in range(2)]
    with pytest.raises(RuntimeError, match="kernel failed"):
        fedavg(updates, [1, 1], threads=2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_native_axpy_is_available_and_exact(dtype):
    # SciPy's Cython BLAS table is what lets threads run axpy without the GIL; without it
    # aggregation silently falls back to one thread, so CI's stack must have it.
    axpy = aggregate._NATIVE_AXPY[np.dtype(dtype)]
    assert axpy is not None
    x = np.array([1.0, -2.0, 0.5, 4.0], dtype=dtype)
    y = np.array([10.0, 20.0, 30.0, 40.0], dtype=dtype)
    axpy(x[1:], y[1:], 2.0)  # offsets: the pointer must follow the view
    np.testing.assert_array_equal(y, np.array([10.0, 16.0, 31.0, 48.0], dtype=dtype))


def test_split_keeps_order_and_balances_elements():
    target = np.empty(100)
    sizes = [10, 10, 10, 10, 40, 10, 10]
    bounds = np.cumsum([0, *sizes])
    blocks = [(target, [], int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    groups = aggregate._split(blocks, 2)
    assert [[w[2] for w in g] for g in groups] == [[0, 10, 20, 30, 40], [80, 90]]
    assert [w for g in aggregate._split(blocks, 3) for w in g] == blocks
    assert len(aggregate._split(blocks, 3)) == 3
    assert len(aggregate._split(blocks[:2], 5)) == 2
    assert aggregate._split(blocks, 1) == [blocks]


def test_fedavg_holds_blas_to_one_thread_during_the_call():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with aggregate._blas_single_thread(10**6):
        inside = {
            i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"
        }
    assert inside == {1}


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_threads(threads):
    with pytest.raises(ConfigError):
        fedavg([[np.zeros(2)]], [1], threads=threads)


def test_weighted_sum_accepts_any_finite_weights():
    updates = [[np.array([1.0, 2.0])], [np.array([10.0, 20.0])], [np.array([5.0, 5.0])]]
    result = weighted_sum(updates, [2.0, -0.5, 0.0])
    _assert_close(result, [np.array([-3.0, -6.0])])


@pytest.mark.parametrize(
    ("weights", "fragment"),
    [
        ([1, 0, 2], "weight 1 must be > 0"),
        ([1, -3, 2], "weight 1 must be > 0"),
        ([1, 2, float("nan")], "weight 2 must be finite"),
        ([float("inf"), 2, 3], "weight 0 must be finite"),
        ([1, 2], "one weight per update (3), got 2"),
        ([1, 2, 3, 4], "one weight per update (3), got 4"),
        ([1, True, 2], "weight 1 must be a real number"),
        ([1, "2", 3], "weight 1 must be a real number"),
    ],
    ids=["zero", "negative", "nan", "inf", "too-few", "too-many", "bool", "str"],
)
def test_bad_weights(weights, fragment):
    updates = [[np.zeros(2)] for _ in range(3)]
    with pytest.raises(AggregationError, match=None) as info:
        fedavg(updates, weights)
    assert fragment in str(info.value)
    assert isinstance(info.value, FedsegError)
    assert info.value.code == "E401"


@pytest.mark.parametrize(
    ("updates", "fragment"),
    [
        ([], "no updates"),
        ([[np.zeros(2)], [np.zeros(2), np.zeros(1)]], "update 1 has 2 arrays"),
        ([[np.zeros(2)], [np.zeros(3)]], "has shape (3,), update 0 has (2,)"),
        ([[np.zeros(2)], [np.zeros(2, dtype=np.int64)]], "expected a floating dtype"),
    ],
    ids=["empty", "array-count", "shape", "int-dtype"],
)
def test_bad_updates(updates, fragment):
    with pytest.raises(AggregationError) as info:
        fedavg(updates, [1] * len(updates))
    assert fragment in str(info.value)


def test_bad_out_overlapping_an_update():
    updates = [[np.zeros(2)], [np.ones(2)]]
    with pytest.raises(AggregationError) as info:
        fedavg(updates, [1, 1], out=[updates[1][0]])
    assert "overlaps" in str(info.value)


def test_apply_delta_keeps_global_dtype():
    global_weights = [np.array([1.0, 2.0], dtype=np.float32), np.array([[0.5]])]
    delta = [np.array([0.25, -1.0]), np.array([[2.0]])]
    result = apply_delta(global_weights, delta, lr=0.5)
    assert [r.dtype for r in result] == [np.float32, np.float64]
    _assert_close(result, [np.array([1.125, 1.5]), np.array([[1.5]])])
    _assert_close(global_weights, [np.array([1.0, 2.0]), np.array([[0.5]])], tol=0.0)


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), "1", True])
def test_bad_apply_delta_lr(lr):
    with pytest.raises(ConfigError):
        apply_delta([np.zeros(1)], [np.zeros(1)], lr=lr)


# -------------------------------------------------------------------------------------- FedProx


def _quadratic_sites(num_sites: int, dim: int = 4, seed: int = 0):
    """Per-site quadratic losses 0.5 * ||A_i w - b_i||^2 (float64)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(6, dim, generator=gen, dtype=torch.float64),
            torch.randn(6, generator=gen, dtype=torch.float64),
        )
        for _ in range(num_sites)
    ]


def _quadratic_loss(w: torch.Tensor, site) -> torch.Tensor:
    a, b = site
    return 0.5 * (a @ w - b).pow(2).sum()


def test_fedprox_mu_zero_is_exact_zero_without_graph():
    params = [torch.randn(3, requires_grad=True, dtype=torch.float64)]
    term = proximal_term(params, [torch.zeros(3, dtype=torch.float64)], mu=0.0)
    assert term.item() == 0.0
    assert term.grad_fn is None
    assert not term.requires_grad
    assert term.dtype == torch.float64


def test_fedprox_mu_zero_training_equals_fedavg_training():
    site = _quadratic_sites(1)[0]
    w_global = torch.randn(4, dtype=torch.float64)
    results = []
    for use_prox in (False, True):
        w = w_global.clone().requires_grad_(True)
        opt = torch.optim.SGD([w], lr=0.05)
        for _ in range(5):
            opt.zero_grad()
            loss = _quadratic_loss(w, site)
            if use_prox:
                loss = loss + proximal_term([w], [w_global], mu=0.0)
            loss.backward()
            opt.step()
        results.append(w.detach().clone())
    assert torch.equal(results[0], results[1])


def test_fedprox_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in SHAPES
    ]
    global_params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    global_params[0].requires_grad_(True)  # must be treated as a constant anyway
    mu = 0.37
    term = proximal_term(params, global_params, mu)
    term.backward()
    expected = (
        mu
        / 2
        * sum(
            float((p - g).detach().pow(2).sum()) for p, g in zip(params, global_params, strict=True)
        )
    )
    assert math.isclose(term.item(), expected, rel_tol=TOL)
    for p, g in zip(params, global_params, strict=True):
        torch.testing.assert_close(p.grad, mu * (p.detach() - g.detach()), rtol=TOL, atol=TOL)
    assert global_params[0].grad is None


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_fedprox_mu(mu):
    with pytest.raises(ConfigError):
        proximal_term([torch.zeros(1)], [torch.zeros(1)], mu)


def test_bad_fedprox_layout():
    with pytest.raises(ValueError, match="fewer"):
        proximal_term([torch.zeros(1), torch.zeros(2)], [torch.zeros(1)], 0.1)
    with pytest.raises(ValueError, match="more"):
        proximal_term([torch.zeros(1)], [torch.zeros(1), torch.zeros(2)], 0.1)
    with pytest.raises(ValueError, match="shape"):
        proximal_term([torch.zeros(1)], [torch.zeros(2)], 0.1)


# ------------------------------------------------------------------------------------- SCAFFOLD


def _local_sgd(w_global, site, steps, lr, c_global=None, c_local=None):
    """K plain SGD steps from w_global; with control variates, SCAFFOLD-corrected steps."""
    w = torch.tensor(w_global, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        _quadratic_loss(w, site).backward()
        if c_global is not None:
            apply_scaffold_correction(
                [w], [torch.from_numpy(c_global)], [torch.from_numpy(c_local)]
            )
        opt.step()
    return w.detach().numpy().copy()


def test_scaffold_round_with_zero_control_variates_equals_unweighted_fedavg():
    # Prepare: 3 sites, zero control variates, global lr 1
    sites = _quadratic_sites(3)
    w_global = np.linspace(-1.0, 1.0, 4)
    zero = np.zeros(4)
    steps, lr = 5, 0.05
    # Execute
    local_models, deltas_w, deltas_c = [], [], []
    for site in sites:
        w_local = _local_sgd(w_global, site, steps, lr, zero, zero)
        _, delta_c = site_control_update([zero], [zero], [w_global], [w_local], steps, lr)
        local_models.append([w_local])
        deltas_w.append([w_local - w_global])
        deltas_c.append(delta_c)
    new_w, new_c = server_update([w_global], [zero], deltas_w, deltas_c, num_sites_total=3)
    # Assert: the paper averages unweighted, so this is FedAvg with equal weights
    _assert_close(new_w, fedavg(local_models, [1, 1, 1]))
    _assert_close(new_w, [np.mean([m[0] for m in local_models], axis=0)])
    _assert_close(new_c, [np.mean([d[0] for d in deltas_c], axis=0)])


def test_scaffold_control_variate_shifts_each_step_by_lr_times_c():
    # Prepare: a quadratic site; c - c_i = c (c_i = 0)
    site = _quadratic_sites(1, seed=7)[0]
    rng = np.random.default_rng(7)
    c = rng.standard_normal(4)
    lr, steps = 0.05, 6
    w = rng.standard_normal(4)
    for _ in range(steps):
        # Execute: one plain and one corrected step from the same point
        plain = _local_sgd(w, site, 1, lr)
        corrected = _local_sgd(w, site, 1, lr, c, np.zeros(4))
        # Assert: the corrected step lands exactly lr * c further
        np.testing.assert_allclose(corrected, plain - lr * c, rtol=0, atol=TOL)
        w = corrected


def test_scaffold_control_variate_on_linear_loss_shifts_k_steps_by_k_lr_c():
    # With a constant gradient the per-step shifts add up: K * lr * (c - c_i)
    g = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    c_global = np.array([0.5, 0.25, -1.0])
    c_local = np.array([0.125, 0.5, 0.0])
    lr, steps = 0.1, 8

    def run(correct: bool) -> np.ndarray:
        w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD([w], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            (g @ w).backward()
            if correct:
                apply_scaffold_correction(
                    [w], [torch.from_numpy(c_global)], [torch.from_numpy(c_local)]
                )
            opt.step()
        return w.detach().numpy().copy()

    shift = run(True) - run(False)
    np.testing.assert_allclose(shift, -steps * lr * (c_global - c_local), rtol=0, atol=TOL)


def test_scaffold_torch_correction_matches_numpy():
    rng = np.random.default_rng(8)
    grad, c, ci = (rng.standard_normal((2, 3)) for _ in range(3))
    param = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    param.grad = torch.from_numpy(grad.copy())
    apply_scaffold_correction([param], [torch.from_numpy(c)], [torch.from_numpy(ci)])
    expected = scaffold_correction([grad], [c], [ci])[0]
    assert np.array_equal(param.grad.numpy(), expected)


def test_scaffold_torch_correction_unused_and_frozen_parameters():
    unused = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    frozen = torch.zeros(2, dtype=torch.float64)
    c = torch.tensor([1.0, 2.0], dtype=torch.float64)
    ci = torch.tensor([0.5, 0.5], dtype=torch.float64)
    apply_scaffold_correction([unused, frozen], [c, c], [ci, ci])
    assert torch.equal(unused.grad, c - ci)
    assert frozen.grad is None


def test_scaffold_site_control_update_formula():
    c_local = [np.array([0.1, 0.2])]
    c_global = [np.array([0.3, -0.1])]
    w_global = [np.array([1.0, 2.0])]
    w_local = [np.array([0.8, 2.3])]
    new_c, delta_c = site_control_update(c_local, c_global, w_global, w_local, 4, 0.5)
    # (w_global - w_local) / (K * lr) = [0.2, -0.3] / 2 = [0.1, -0.15]
    _assert_close(delta_c, [np.array([0.1 - 0.3, -0.15 + 0.1])])
    _assert_close(new_c, [np.array([0.1 - 0.3 + 0.1, 0.2 + 0.1 - 0.15])])


def test_scaffold_partial_participation_keeps_c_the_mean_of_site_variates():
    # Sites that skip a round keep their c_i; the server scales by |S|/N.
    rng = np.random.default_rng(9)
    num_sites, dim = 4, 3
    c_sites = [np.zeros(dim) for _ in range(num_sites)]
    c_server = [np.zeros(dim)]
    w = [np.zeros(dim)]
    for participants in ([0, 2], [1, 2, 3], [3]):
        deltas_w, deltas_c = [], []
        for i in participants:
            w_local = [w[0] + rng.standard_normal(dim)]
            new_c, delta_c = site_control_update([c_sites[i]], c_server, w, w_local, 3, 0.1)
            c_sites[i] = new_c[0]
            deltas_w.append([w_local[0] - w[0]])
            deltas_c.append(delta_c)
        w, c_server = server_update(w, c_server, deltas_w, deltas_c, num_sites, global_lr=0.7)
        _assert_close(c_server, [np.mean(c_sites, axis=0)])


def test_scaffold_server_update_global_lr():
    w = [np.array([1.0, 1.0])]
    deltas_w = [[np.array([1.0, 0.0])], [np.array([3.0, -2.0])]]
    deltas_c = [[np.array([2.0, 2.0])], [np.array([4.0, 0.0])]]
    new_w, new_c = server_update(w, [np.zeros(2)], deltas_w, deltas_c, 4, global_lr=0.5)
    _assert_close(new_w, [np.array([1.0 + 0.5 * 2.0, 1.0 - 0.5 * 1.0])])
    _assert_close(new_c, [np.array([(2.0 + 4.0) / 4, 2.0 / 4])])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"num_sites_total": 1}, ConfigError),
        ({"num_sites_total": 2.0}, ConfigError),
        ({"global_lr": 0.0}, ConfigError),
        ({"global_lr": float("nan")}, ConfigError),
        ({"deltas_c": [[np.zeros(2)]]}, AggregationError),
        ({"deltas_w": [], "deltas_c": []}, AggregationError),
    ],
    ids=["too-few-sites", "float-sites", "zero-lr", "nan-lr", "count-mismatch", "empty"],
)
def test_bad_scaffold_server_update(kwargs, error):
    args = {
        "w_global": [np.zeros(2)],
        "c_global": [np.zeros(2)],
        "deltas_w": [[np.zeros(2)], [np.zeros(2)]],
        "deltas_c": [[np.zeros(2)], [np.zeros(2)]],
        "num_sites_total": 3,
    } | kwargs
    with pytest.raises(error):
        server_update(**args)


@pytest.mark.parametrize(("steps", "lr"), [(0, 0.1), (1.5, 0.1), (True, 0.1), (2, 0.0), (2, -1.0)])
def test_bad_scaffold_site_control_update(steps, lr):
    z = [np.zeros(2)]
    with pytest.raises(ConfigError):
        site_control_update(z, z, z, z, steps, lr)


# ---------------------------------------------------------------------------------- FedAdam/Yogi


def test_fedadam_first_step_by_hand():
    w, delta = [np.array([1.0, 2.0])], [np.array([0.5, -0.2])]
    new_w, m, v = fedadam_step(w, delta, None, None, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    # m = 0.1 * delta; v = 0.01 * delta^2, sqrt(v) = |delta| / 10
    _assert_close(m, [np.array([0.05, -0.02])])
    _assert_close(v, [np.array([0.0025, 0.0004])])
    _assert_close(new_w, [np.array([1.0 + 0.1 * 0.05 / 0.051, 2.0 - 0.1 * 0.02 / 0.021])])


def test_fedadam_first_step_with_flower_bias_correction():
    w, delta = [np.array([1.0, 2.0])], [np.array([0.5, -0.2])]
    new_w, _, _ = fedadam_step(w, delta, None, None, lr=0.1, server_round=1)
    eta = 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)  # Flower: exponent server_round + 1
    _assert_close(new_w, [np.array([1.0 + eta * 0.05 / 0.051, 2.0 - eta * 0.02 / 0.021])])


def test_fedyogi_first_and_second_step_by_hand():
    w, d1, d2 = [np.array([1.0, 2.0])], [np.array([0.5, -0.2])], [np.array([0.1, -0.4])]
    # First step from v = 0: sign(0 - d^2) = -1, so v = 0.01 d^2 as in Adam
    w1, m1, v1 = fedyogi_step(w, d1, None, None, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    _assert_close(v1, [np.array([0.0025, 0.0004])])
    _assert_close(w1, [np.array([1.0 + 0.1 * 0.05 / 0.051, 2.0 - 0.1 * 0.02 / 0.021])])
    # Second step: d^2 = [0.01, 0.16]; v - d^2 = [-0.0075, -0.1596] -> both signs -1
    w2, m2, v2 = fedyogi_step(w1, d2, m1, v1, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    expected_m = np.array([0.9 * 0.05 + 0.1 * 0.1, 0.9 * -0.02 + 0.1 * -0.4])
    expected_v = np.array([0.0025 + 0.01 * 0.01, 0.0004 + 0.01 * 0.16])
    _assert_close(m2, [expected_m])
    _assert_close(v2, [expected_v])
    _assert_close(w2, [w1[0] + 0.1 * expected_m / (np.sqrt(expected_v) + 1e-3)])


def test_fedadagrad_first_step_by_hand():
    w, delta = [np.array([1.0, 2.0])], [np.array([0.5, -0.2])]
    new_w, m, v = fedadagrad_step(w, delta, None, None, lr=0.1, tau=1e-3)
    _assert_close(m, delta)
    _assert_close(v, [np.array([0.25, 0.04])])
    _assert_close(new_w, [np.array([1.0 + 0.1 * 0.5 / 0.501, 2.0 - 0.1 * 0.2 / 0.201])])


def test_fedopt_keeps_float32():
    w = [np.ones(3, dtype=np.float32)]
    delta = [np.full(3, 0.1, dtype=np.float32)]
    for step in (fedadam_step, fedyogi_step):
        results = step(w, delta, None, None, lr=0.1)
        assert [r[0].dtype for r in results] == [np.float32] * 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.0},
        {"lr": float("nan")},
        {"lr": 0.1, "beta1": 1.0},
        {"lr": 0.1, "beta2": -0.1},
        {"lr": 0.1, "tau": 0.0},
        {"lr": 0.1, "server_round": 0},
        {"lr": 0.1, "server_round": 1.0},
    ],
    ids=["lr-zero", "lr-nan", "beta1-one", "beta2-negative", "tau-zero", "round-0", "round-float"],
)
def test_bad_fedadam_hyperparameters(kwargs):
    with pytest.raises(ConfigError):
        fedadam_step([np.zeros(1)], [np.zeros(1)], None, None, **kwargs)


def test_bad_fedopt_layout():
    with pytest.raises(AggregationError, match="delta"):
        fedyogi_step([np.zeros(2)], [np.zeros(3)], None, None, lr=0.1)


def _flower_reply(arrays: dict[str, np.ndarray], num_examples: int, node: int):
    from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": num_examples}),
        }
    )
    # Replies normally get their metadata from the SuperLink; build it by hand here.
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="i",
        group_id="1",
        created_at=0.0,
        ttl=3600.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)


@pytest.mark.parametrize("name", ["FedAdam", "FedYogi", "FedAdagrad"])
def test_fedopt_matches_flower_strategy(name, monkeypatch, tmp_path):
    # Prepare: three rounds of three replies on a two-tensor model
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    strategies = pytest.importorskip("flwr.serverapp.strategy")
    hyper = {"eta": 0.05, "tau": 1e-3}
    if name != "FedAdagrad":
        hyper |= {"beta_1": 0.8, "beta_2": 0.95}
    flower = getattr(strategies, name)(**hyper)
    rng = np.random.default_rng(10)
    keys, shapes = ["conv.weight", "conv.bias"], [(2, 3), (3,)]
    w = [rng.standard_normal(s) for s in shapes]
    m = v = None
    for server_round in (1, 2, 3):
        models = [[x + 0.1 * rng.standard_normal(x.shape) for x in w] for _ in range(3)]
        counts = [5, 11, 2]
        # Execute: Flower's strategy ...
        flower.current_arrays = {k: x.copy() for k, x in zip(keys, w, strict=True)}
        replies = [
            _flower_reply(dict(zip(keys, model, strict=True)), n, node)
            for node, (model, n) in enumerate(zip(models, counts, strict=True), start=1)
        ]
        record, _ = flower.aggregate_train(server_round, replies)
        expected = [record[k].numpy() for k in keys]
        # ... and ours on the same inputs
        delta = [a - x for a, x in zip(fedavg(models, counts), w, strict=True)]
        if name == "FedAdam":
            w, m, v = fedadam_step(
                w, delta, m, v, lr=0.05, beta1=0.8, beta2=0.95, tau=1e-3, server_round=server_round
            )
        elif name == "FedYogi":
            w, m, v = fedyogi_step(w, delta, m, v, lr=0.05, beta1=0.8, beta2=0.95, tau=1e-3)
        else:
            w, m, v = fedadagrad_step(w, delta, m, v, lr=0.05, tau=1e-3)
        # Assert
        _assert_close(w, expected, tol=1e-10)


def test_fedavgm_two_steps_by_hand():
    w, d1, d2 = [np.array([1.0, 2.0])], [np.array([0.5, -1.0])], [np.array([0.1, 0.0])]
    # Round 1: buffer = -d1 = [-0.5, 1]; w = w - 0.1 * buffer = [1.05, 1.9]
    w1, b1 = fedavgm_step(w, d1, None, momentum=0.9)
    np.testing.assert_allclose(w1[0], [1.05, 1.9])
    np.testing.assert_allclose(b1[0], [-0.5, 1.0])
    # Round 2: buffer = 0.9 * [-0.5, 1] + [-0.1, 0] = [-0.55, 0.9]; w = [1.105, 1.81]
    w2, b2 = fedavgm_step(w1, d2, b1, momentum=0.9)
    np.testing.assert_allclose(b2[0], [-0.55, 0.9])
    np.testing.assert_allclose(w2[0], [1.105, 1.81])
    # momentum 0 with lr 1 is plain FedAvg: w + delta
    w3, _ = fedavgm_step(w, d1, None, momentum=0.0, lr=1.0)
    np.testing.assert_allclose(w3[0], w[0] + d1[0])


@pytest.mark.parametrize("kwargs", [{"momentum": 1.0}, {"momentum": -0.1}, {"lr": 0.0}])
def test_bad_fedavgm_hyperparameters(kwargs):
    with pytest.raises(ConfigError):
        fedavgm_step([np.zeros(1)], [np.zeros(1)], None, **kwargs)


def test_fedavgm_matches_flower_strategy(monkeypatch, tmp_path):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    strategies = pytest.importorskip("flwr.serverapp.strategy")
    from flwr.app import Array, ArrayRecord

    flower = strategies.FedAvgM(server_learning_rate=0.3, server_momentum=0.7)
    rng = np.random.default_rng(11)
    keys, shapes = ["conv.weight", "conv.bias"], [(2, 3), (3,)]
    w = [rng.standard_normal(s) for s in shapes]
    buffer = None
    flower.current_arrays = ArrayRecord({k: Array(x.copy()) for k, x in zip(keys, w, strict=True)})
    for server_round in (1, 2, 3):
        models = [[x + 0.1 * rng.standard_normal(x.shape) for x in w] for _ in range(3)]
        counts = [5, 11, 2]
        replies = [
            _flower_reply(dict(zip(keys, model, strict=True)), n, node)
            for node, (model, n) in enumerate(zip(models, counts, strict=True), start=1)
        ]
        record, _ = flower.aggregate_train(server_round, replies)
        expected = [record[k].numpy() for k in keys]
        delta = [a - x for a, x in zip(fedavg(models, counts), w, strict=True)]
        w, buffer = fedavgm_step(w, delta, buffer, momentum=0.7, lr=0.3)
        _assert_close(w, expected, tol=1e-10)


# ---------------------------------------------------------------------------------------- FedBN


@pytest.fixture(scope="module")
def unet():
    monai_nets = pytest.importorskip("monai.networks.nets")
    return monai_nets.UNet(
        spatial_dims=3,
        in_channels=4,
        out_channels=3,
        channels=(8, 16, 32, 64),
        strides=(2, 2, 2),
        num_res_units=2,
        norm=("instance", {"affine": True}),
    )


def test_fedbn_split_merge_round_trip_on_monai_unet(unet):
    # Prepare
    state = {k: v.numpy() for k, v in unet.state_dict().items()}
    # Execute
    shared, local = split_local(state)
    merged = merge(shared, local, order=state.keys())
    # Assert
    assert list(merged) == list(state)
    assert all(merged[k] is state[k] for k in state)
    assert len(local) == 26  # 13 InstanceNorm3d layers x (weight, bias)
    assert len(shared) == len(state) - 26
    assert all(k.endswith((".adn.N.weight", ".adn.N.bias")) for k in local)
    assert sorted(local) == sorted(norm_keys_of_module(unet))
    assert not any(k.endswith(".adn.A.weight") for k in local)  # PReLU stays shared


def test_fedbn_merge_default_order_and_errors():
    shared, local = {"conv.weight": 1, "conv.bias": 2}, {"bn.weight": 3}
    assert list(merge(shared, local)) == ["conv.weight", "conv.bias", "bn.weight"]
    with pytest.raises(ValueError, match="both"):
        merge(shared, {"conv.bias": 5})
    with pytest.raises(ValueError, match="missing"):
        merge(shared, local, order=["conv.weight", "bn.weight"])
    with pytest.raises(ValueError, match="unknown"):
        merge(shared, local, order=["conv.weight", "conv.bias", "bn.weight", "x.weight"])


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("model.0.conv.unit0.adn.N.weight", True),
        ("model.2.0.adn.N.bias", True),
        ("model.0.conv.unit0.adn.A.weight", False),
        ("model.0.conv.unit0.conv.weight", False),
        ("model.0.residual.bias", False),
        ("layer1.0.bn2.running_var", True),
        ("encoder.norm.bias", True),
        ("blocks.3.batch_norm.num_batches_tracked", True),
        ("head.conv_bn.running_mean", True),
        ("decoder.gn1.weight", True),
        ("sign.weight", False),
        ("normal_init.weight", False),
        ("adn.N.other", False),
        ("weight", False),
        ("_module.model.0.conv.unit0.adn.N.weight", True),  # Opacus GradSampleModule prefix
    ],
)
def test_is_norm_key(key, expected):
    assert is_norm_key(key) is expected


def test_scaffold_step_correction_equals_gradient_correction_under_sgd():
    import torch

    from fedseg.strategies.scaffold import apply_scaffold_step_correction

    torch.manual_seed(0)
    target = torch.randn(5, dtype=torch.float64)
    c = [torch.randn(5, dtype=torch.float64)]
    ci = [torch.randn(5, dtype=torch.float64)]
    lr = 0.1
    results = []
    for mode in ("grad", "step"):
        w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD([w], lr=lr)
        for _ in range(4):
            opt.zero_grad()
            ((w - target) ** 2).sum().backward()
            if mode == "grad":
                apply_scaffold_correction([w], c, ci)
            opt.step()
            if mode == "step":
                apply_scaffold_step_correction([w], [c[0] - ci[0]], lr)
        results.append(w.detach().numpy().copy())
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=1e-12)


def test_scaffold_step_correction_shifts_by_exactly_lr_c():
    import torch

    from fedseg.strategies.scaffold import apply_scaffold_step_correction

    w = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    c = [torch.tensor([0.5, 0.0, -1.0], dtype=torch.float64)]
    apply_scaffold_step_correction([w], c, 0.2)
    assert w.detach().tolist() == [1.0 - 0.1, -2.0, 3.0 + 0.2]
    with pytest.raises(ValueError, match="shape"):
        apply_scaffold_step_correction([w], [torch.zeros(2)], 0.1)
    with pytest.raises(ValueError, match="1 parameters but 2"):
        apply_scaffold_step_correction([w], [c[0], c[0]], 0.1)
    assert w.detach().tolist() == [1.0 - 0.1, -2.0, 3.0 + 0.2]  # refused before any change


def test_scaffold_site_correction_is_c_minus_c_i():
    from fedseg.strategies.scaffold import site_correction

    c = [np.array([0.5, 0.25]), np.array([[1.0]])]
    ci = [np.array([0.5, -0.25]), np.array([[3.0]])]
    got = site_correction(c, ci)
    assert [g.tolist() for g in got] == [[0.0, 0.5], [[-2.0]]]
    with pytest.raises(AggregationError, match="shape"):
        site_correction(c, [ci[0], np.zeros(2)])
