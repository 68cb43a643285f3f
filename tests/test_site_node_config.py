"""A site's node config: unknown keys are refused, and a CKKS run without the site's key is
refused before the site's policy books any epsilon.

Sites are configured as deployed ones (``data-path``, ``policy-file``, ``state-dir`` in the
node config) and receive one training message on the in-process grid, through the ClientApp's
boundary (:func:`fedseg.federation.client_app.guarded_reply`), as a SuperNode would.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType
from flwr.common.config import parse_config_args
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY

from fedseg.config import FedsegConfig
from fedseg.errors import ConfigError
from fedseg.federation import records as R
from fedseg.federation import site
from fedseg.federation.client_app import build_client_app
from fedseg.federation.inprocess import InProcessGrid
from fedseg.site.lifetime import LEDGER_FILE, LifetimeLedger
from fedseg.site.policy import default_policy, policy_to_toml


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Every test of this module with one torch thread (:func:`conftest.one_torch_thread`)."""


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers import write_cohort

    root = tmp_path_factory.mktemp("node-config-site") / "hospital-b"
    write_cohort(root, 3, seed=2)
    return root


def _cfg(**kw: Any) -> FedsegConfig:
    from helpers import tiny_cfg

    return tiny_cfg(**{"num_server_rounds": 1, "num_sites": 1, "round_timeout": 30.0, **kw})


def _context(node: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})


def _deployed_node(data: Path, folder: Path, **extra: str) -> dict[str, Any]:
    """A deployed site's node config with the strict default policy (DP-SGD required)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.toml").write_text(policy_to_toml(default_policy("hospital-b-default")))
    return {
        "data-path": str(data),
        "site-name": "hospital-b",
        "policy-file": str(folder / "policy.toml"),
        "state-dir": str(folder / "state"),
        **extra,
    }


def _train_once(
    node: dict[str, Any], cfg: FedsegConfig, caplog: pytest.LogCaptureFixture
) -> tuple[Message, BaseException | None]:
    """One training message to a site with ``node``: its reply and the exception it logged."""
    from fedseg.federation.server_app import initial_model

    grid = InProcessGrid(build_client_app(), [node], cfg.to_run_config())
    for ctx in grid.contexts.values():
        ctx.run_id = 1
    weights, _ = initial_model(cfg)
    content = RecordDict(
        {R.ARRAYS: R.to_array_record(weights), R.CONFIG: ConfigRecord({"server-round": 1})}
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedseg.site"):
        (reply,) = grid.send_and_receive(
            [Message(content, next(iter(grid.contexts)), MessageType.TRAIN)]
        )
    logged = [r.exc_info[1] for r in caplog.records if r.exc_info and r.exc_info[1]]
    return reply, (logged[0] if logged else None)


# ----------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("node", "fragment"),
    [
        (
            {"data-path": "/data/b", "policy_file": "/site/policy.toml"},
            "unknown key 'policy_file' (did you mean 'policy-file'?); known keys: ",
        ),
        ({"data_path": "/data/b"}, "unknown key 'data_path' (did you mean 'data-path'?)"),
        (
            {"data-path": "/data/b", "ckks-keyfile": "/secrets/ckks.ctx"},
            "unknown key 'ckks-keyfile' (did you mean 'ckks-key-file'?)",
        ),
        ({"partition-id": 0, "partition_id": 1}, "(did you mean 'partition-id'?)"),
        ({"data-path": "/data/b", "zzz": 1}, "unknown key 'zzz'; known keys: "),
        (
            {"data-path": "/data/b", "site_name": "b", "state_dir": "/s"},
            "unknown keys 'site_name' (did you mean 'site-name'?), "
            "'state_dir' (did you mean 'state-dir'?); ",
        ),
    ],
    ids=["policy-file", "data-path", "ckks-key-file", "partition-id", "no-match", "two"],
)
def test_bad_node_config_key_is_refused_with_the_closest_and_known_keys(
    node: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        site.resolve_site(_context(node), FedsegConfig())

    message = str(raised.value)
    assert message.startswith("node config: unknown key")
    assert fragment in message
    assert message.endswith("known keys: " + ", ".join(sorted(site.NODE_CONFIG_KEYS)))


def test_every_key_fedseg_or_flower_writes_is_known() -> None:
    from fedseg.deploy.provision import FederationSpec, HospitalSpec, supernode_command
    from fedseg.secure.ckks_federation import KEY_FILE

    spec = FederationSpec(address="10.0.0.1", sites=(HospitalSpec("hospital-a"),))
    command = supernode_command(spec, spec.sites[0], "/site", "/data", ckks=True)
    provisioned = parse_config_args([command[command.index("--node-config") + 1]])
    # what Flower's Simulation Engine gives a virtual node, and keys other modules read
    simulated = {PARTITION_ID_KEY: 0, NUM_PARTITIONS_KEY: 2}
    read_elsewhere = {KEY_FILE, site.POLICY_FILE_KEY, "attack", "attack-strength", "seg-model"}

    assert {*provisioned, *simulated, *read_elsewhere} <= site.NODE_CONFIG_KEYS
    assert "cache-dir" in site.NODE_CONFIG_KEYS and "clinical-file" in site.NODE_CONFIG_KEYS
    site.check_node_config({**provisioned, "cache-dir": "/state/cache"})
    site.check_node_config(simulated)
    site.check_node_config({})


def test_a_misspelt_policy_file_stops_the_site_instead_of_training_unguarded(
    site_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = _deployed_node(site_data, tmp_path / "site")
    node["policy_file"] = node.pop("policy-file")

    reply, logged = _train_once(node, _cfg(), caplog)

    assert R.reply_error(reply.content) == "E100:ConfigError"
    assert reply.content.array_records == {}
    assert isinstance(logged, ConfigError)
    assert "unknown key 'policy_file' (did you mean 'policy-file'?)" in str(logged)
    assert not (tmp_path / "site" / "state").exists()  # no state, no prepared case


# ------------------------------------------------------------ CKKS without the site's key


def _ckks_dp_cfg() -> FedsegConfig:
    return _cfg(
        dp_mode="sample", dp_target_epsilon=3.0, dp_trainable="norm", secure_aggregation="ckks"
    )


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        (None, "needs the sites' shared key"),
        ("missing", "'ckks-key-file': no key file there"),
        ("garbage", "'ckks-key-file': "),
    ],
    ids=["no-key-file-key", "missing-file", "not-a-ckks-context"],
)
def test_bad_ckks_key_refuses_training_before_the_ledger_books_epsilon(
    site_data: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    key: str | None,
    fragment: str,
) -> None:
    extra = {}
    if key is not None:
        extra["ckks-key-file"] = str(tmp_path / "ckks.ctx")
    if key == "garbage":
        (tmp_path / "ckks.ctx").write_bytes(b"not a tenseal context")
    node = _deployed_node(site_data, tmp_path / "site", **extra)

    reply, logged = _train_once(node, _ckks_dp_cfg(), caplog)

    assert R.reply_error(reply.content) == "E100:ConfigError"
    assert isinstance(logged, ConfigError)
    assert fragment in str(logged)
    # refused before the policy admitted the round: the ledger was never written
    assert not (tmp_path / "site" / "state" / LEDGER_FILE).exists()
    assert not (tmp_path / "site" / "state").exists()  # nor any case prepared (state/cache)


def test_with_its_key_the_same_ckks_site_is_admitted_and_booked(
    site_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedseg.secure.ckks_federation import CIPHERTEXT, ckks_params, write_key_file

    cfg = _ckks_dp_cfg()
    write_key_file(tmp_path / "ckks.ctx", ckks_params(cfg))
    node = _deployed_node(
        site_data, tmp_path / "site", **{"ckks-key-file": str(tmp_path / "ckks.ctx")}
    )

    reply, logged = _train_once(node, cfg, caplog)

    assert logged is None and R.reply_error(reply.content) is None
    assert CIPHERTEXT in reply.content.array_records
    ledger = LifetimeLedger(tmp_path / "site" / "state" / LEDGER_FILE)
    assert 2.9 < ledger.run_cost("run-1", 1e-5).charged <= 3.0
