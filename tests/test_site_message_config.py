"""The per-round values a site reads from the server's message (``server-round``,
``local-epochs``, ``proximal-mu``...): numbers are taken, anything else is refused by name.

A ConfigRecord may hold lists and bytes; a value a site cannot read as a number is a malformed
message (``UpdateValidationError``, code E400), not a crash of the site's handler.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import MessageType

from fedseg.errors import UpdateValidationError
from fedseg.federation import records as R
from fedseg.federation.site import _conf_float, _conf_int


@pytest.mark.parametrize(
    ("record", "expected"),
    [({"server-round": 3}, 3), ({"server-round": "4"}, 4), ({"server-round": 5.0}, 5), ({}, 9)],
)
def test_an_integer_entry_is_read_or_defaults(record: dict, expected: int) -> None:
    assert _conf_int(ConfigRecord(record), "server-round", 9) == expected


@pytest.mark.parametrize("value", [[1, 2], "two", b"\x01", 0, -1])
def test_an_integer_entry_that_is_no_number_or_too_small_is_refused_by_name(value: object) -> None:
    with pytest.raises(UpdateValidationError, match="'local-epochs' is .*expected an integer >= 1"):
        _conf_int(ConfigRecord({"local-epochs": value}), "local-epochs", 1, minimum=1)


def test_a_number_entry_is_read_or_refused_by_name() -> None:
    assert _conf_float(ConfigRecord({"proximal-mu": "0.25"}), "proximal-mu", 0.0) == 0.25
    assert _conf_float(ConfigRecord({}), "proximal-mu", 0.01) == 0.01
    with pytest.raises(UpdateValidationError, match="'proximal-mu' is \\[0.1, 0.2\\]; expected"):
        _conf_float(ConfigRecord({"proximal-mu": [0.1, 0.2]}), "proximal-mu", 0.0)


def test_a_training_message_with_a_malformed_round_gets_an_error_reply(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the ClientApp: the reply carries E400 and the site's log names the key."""
    from helpers import make_grid, tiny_cfg, write_cohort

    from fedseg.federation.server_app import initial_model

    root = tmp_path / "data"
    ids = write_cohort(root, 4)
    grid, cfg = make_grid(tiny_cfg(num_server_rounds=1), root, {"site-0": ids}, tmp_path)
    weights, _ = initial_model(cfg)
    content = RecordDict(
        {
            R.ARRAYS: R.to_array_record(weights),
            R.CONFIG: ConfigRecord({"server-round": [1, 2], "local-epochs": 1}),
        }
    )
    with caplog.at_level(logging.WARNING):
        node = next(iter(grid.contexts))
        (reply,) = grid.send_and_receive([Message(content, node, MessageType.TRAIN)])

    assert R.reply_error(reply.content) == "E400:UpdateValidationError"
    assert "'server-round' is [1, 2]; expected an integer" in caplog.text
