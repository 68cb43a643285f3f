"""CKKS secure aggregation cost: ciphertext bytes and time per million parameters per site.

For each parameter set (the default N = 4096 symmetric one of :mod:`fedseg.secure.ckks`, and the
anchor of the issue: N = 8192, ``[60, 40, 40, 60]``, scale 2**40, public-key encryption) this
encrypts K sites' vectors of P values (``n_i * w_i`` with realistic weight magnitudes), adds them
with a keyless context as the server does, decrypts the sum, and reports per million values per
site:

- ``encrypt_s``: encryption + serialisation at a site;
- ``aggregate_s``: the server's deserialisation + addition, divided by K;
- ``decrypt_s``: one decryption of the sum (done once per round, by one site);
- ``total_s``: their sum (target <= 1 s);
- ``ratio``: ciphertext bytes / float32 bytes (target <= 10);
- ``max_abs_err`` of the decrypted weighted average against float64, and the same relative to
  the typical size of one round's update (``update_scale``, std of w_i - w_global = 1e-3 here).

Then the SecAgg+ overhead of one whole training half-round (:func:`run_secagg`).

Each timing is the best of ``--repeat`` runs (a shared machine's neighbours only add time);
``--clock cpu`` measures this process's CPU time instead of wall time, which is what an idle
machine's wall time would be for this single-threaded work when other processes crowd the
cores. The 1-minute load average is printed beside the figures. Prints one JSON line per
parameter set.

Usage::

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_secure.py \
        [--params 1000000] [--sites 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import numpy as np

from fedseg.secure import ckks as C


def _anchor_context() -> object:
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2.0**40
    return ctx


def _encrypt_anchor(ctx: object, vec: np.ndarray, slots: int) -> list[bytes]:
    import tenseal as ts

    return [
        bytes(ts.ckks_vector(ctx, vec[i : i + slots].tolist()).serialize())
        for i in range(0, vec.size, slots)
    ]


def run(
    name: str, params: int, sites: int, repeat: int, anchor: bool, clock: str = "wall"
) -> dict[str, object]:
    """Measure one parameter set; see the module docstring for the keys."""
    rng = np.random.default_rng(0)
    w_global = rng.normal(0, 0.05, params)
    updates = [w_global + rng.normal(0, 1e-3, params) for _ in range(sites)]
    counts = [int(n) for n in rng.integers(5, 40, sites)]
    if anchor:
        key = _anchor_context()
        slots = 4096
        server = C.params_context(
            key.serialize(  # type: ignore[attr-defined]
                save_public_key=False,
                save_secret_key=False,
                save_galois_keys=False,
                save_relin_keys=False,
            )
        )
    else:
        cp = C.CkksParams()
        key = C.create_secret_context(cp)
        slots = cp.slots
        server = C.params_context(C.params_bytes(key))
    now = time.process_time if clock == "cpu" else time.perf_counter
    best = {"encrypt": float("inf"), "aggregate": float("inf"), "decrypt": float("inf")}
    for _ in range(repeat):
        t0 = now()
        if anchor:
            cts = [_encrypt_anchor(key, n * u, slots) for u, n in zip(updates, counts, strict=True)]
        else:
            cts = [
                C.encrypt_vector(key, n * u, cp, num_terms=sites)
                for u, n in zip(updates, counts, strict=True)
            ]
        t1 = now()
        summed = C.add_encrypted(server, cts)
        t2 = now()
        total = C.decrypt_vector(key, summed, params)
        t3 = now()
        best["encrypt"] = min(best["encrypt"], (t1 - t0) / sites)
        best["aggregate"] = min(best["aggregate"], (t2 - t1) / sites)
        best["decrypt"] = min(best["decrypt"], t3 - t2)
    average = total / sum(counts)
    reference = np.average(np.stack(updates), axis=0, weights=counts)
    err = float(np.max(np.abs(average - reference)))
    per_million = 1e6 / params
    enc, agg, dec = (best[k] * per_million for k in ("encrypt", "aggregate", "decrypt"))
    nbytes = sum(len(b) for b in cts[0])
    return {
        "name": name,
        "clock": clock,
        "params": params,
        "sites": sites,
        "encrypt_s": round(enc, 3),
        "aggregate_s": round(agg, 3),
        "decrypt_s": round(dec, 3),
        "total_s": round(enc + agg + dec, 3),
        "ratio": round(nbytes / (4 * params), 2),
        "ciphertext_mb_per_million": round(nbytes * per_million / 1e6, 2),
        "max_abs_err": err,
        "err_vs_update_scale": err / 1e-3,
        "load1": os.getloadavg()[0],
    }


def run_secagg(params: int, sites: int, repeat: int, clock: str = "wall") -> dict[str, object]:
    """SecAgg+ overhead: one training half-round with and without it, in process.

    K in-process sites (:class:`~fedseg.federation.inprocess.InProcessGrid`) answer a train
    message with the global model plus noise (no real training), behind the same
    ``secagg_train_mod`` as the real ClientApp; the server runs ``FedsegStrategy.run_train``.
    The difference of the two wall times is the protocol's cost (key agreement, secret
    sharing, quantisation, masks, unmasking), all on this one machine; per million parameters
    per site it is ``(t_secagg - t_plain) / K / (P / 1e6)``.
    """
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fedseg.config import FedsegConfig
    from fedseg.federation import records as R
    from fedseg.federation.inprocess import InProcessGrid
    from fedseg.federation.strategy import FedsegStrategy
    from fedseg.secure.secagg import secagg_train_mod

    app = ClientApp()

    @app.train(mods=[secagg_train_mod])
    def train(msg: Message, context: Context) -> Message:
        i = int(context.node_config["i"])
        w = R.from_array_record(msg.content.array_records[R.ARRAYS])
        rng = np.random.default_rng(i)
        new = {k: (v + rng.normal(0, 1e-3, v.shape)).astype(v.dtype) for k, v in w.items()}
        metrics = MetricRecord({"num-examples": 10 + i, "train-seconds": 0.0})
        return Message(
            RecordDict({R.ARRAYS: R.to_array_record(new), R.METRICS: metrics}), reply_to=msg
        )

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        name = R.site_record(f"site-{context.node_config['i']}")
        return Message(RecordDict({R.SITE: name}), reply_to=msg)

    now = time.process_time if clock == "cpu" else time.perf_counter
    model = {"w": np.random.default_rng(0).normal(0, 0.05, params).astype(np.float32)}
    times: dict[str, float] = {}
    weights: dict[str, np.ndarray] = {}
    for mode in ("none", "secagg+", "none"):  # the first plain pass only warms up
        cfg = FedsegConfig(secure_aggregation=mode, num_sites=sites, secagg_max_weight=100.0)
        grid = InProcessGrid(app, [{"i": i} for i in range(sites)])
        best = float("inf")
        for _ in range(repeat):
            strategy = FedsegStrategy(cfg)
            strategy.discover_sites(grid, timeout=60)
            t0 = now()
            new, _ = strategy.run_train(grid, 1, R.to_array_record(model), 600.0)
            best = min(best, now() - t0)
        if new is None:
            raise RuntimeError(f"the {mode} round failed")
        times[mode] = best
        weights[mode] = R.from_array_record(new)["w"]
    per_million = 1e6 / params
    return {
        "name": "SecAgg+ (Flower 1.41 workflow + secaggplus_mod), in process",
        "clock": clock,
        "params": params,
        "sites": sites,
        "plain_round_s": round(times["none"], 3),
        "secagg_round_s": round(times["secagg+"], 3),
        "overhead_s_per_million_per_site": round(
            (times["secagg+"] - times["none"]) / sites * per_million, 3
        ),
        "max_abs_err": float(np.max(np.abs(weights["secagg+"] - weights["none"]))),
        "load1": os.getloadavg()[0],
    }


def main() -> None:
    """Parse options, measure both parameter sets, print JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-anchor", action="store_true", help="skip the N=8192 anchor")
    parser.add_argument("--no-secagg", action="store_true", help="skip the SecAgg+ round")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (closer to an idle machine's wall time "
        "when other processes share the cores; everything here runs on one thread)",
    )
    args = parser.parse_args()
    command = shlex.join([sys.executable, *sys.argv])
    sets = [("default N=4096 [54,54] 2^30 symmetric", False)]
    if not args.no_anchor:
        sets.append(("anchor N=8192 [60,40,40,60] 2^40 public-key", True))
    for name, anchor in sets:
        row = run(name, args.params, args.sites, args.repeat, anchor, args.clock)
        row["command"] = command
        print(json.dumps(row), flush=True)
    if not args.no_secagg:
        row = run_secagg(args.params, args.sites, args.repeat, args.clock)
        row["command"] = command
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
