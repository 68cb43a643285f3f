"""The ClientApp's boundary (:func:`fedseg.federation.client_app.guarded_reply`): a failure
reply names the site and carries only the code; a handler that succeeds finds its site once."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import MessageType

from fedseg.config import FedsegConfig
from fedseg.errors import DataError
from fedseg.federation import client_app, site
from fedseg.federation import records as R
from fedseg.federation.inprocess import InProcessGrid


def _context(tmp_path: Path) -> Context:
    node = {"data-path": str(tmp_path), "site-name": "hospital-x"}
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})


def _message() -> Message:
    InProcessGrid(ClientApp(), [])  # gives the process the ServerApp's identity, as Flower does
    return Message(RecordDict(), 7, MessageType.TRAIN)


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every name :func:`site.resolve_site` found, in order."""
    found: list[str] = []
    resolve = site.resolve_site

    def counted(context: Context, cfg: FedsegConfig) -> site.SiteSpec:
        spec = resolve(context, cfg)
        found.append(spec.name)
        return spec

    monkeypatch.setattr(site, "resolve_site", counted)
    return found


def test_a_handler_that_succeeds_finds_its_site_once(tmp_path: Path, lookups: list[str]) -> None:
    def handler(msg: Message, context: Context, cfg: FedsegConfig) -> RecordDict:
        return RecordDict({R.SITE: R.site_record(site.resolve_site(context, cfg).name)})

    reply = client_app.guarded_reply(handler, _message(), _context(tmp_path))

    assert R.reply_site_name(reply.content) == "hospital-x"
    assert lookups == ["hospital-x"]


def test_a_failure_reply_names_the_site_and_only_the_code(
    tmp_path: Path, lookups: list[str]
) -> None:
    def handler(msg: Message, context: Context, cfg: FedsegConfig) -> RecordDict:
        raise DataError(f"case {tmp_path / 'secret-case'} is corrupt")

    reply = client_app.guarded_reply(handler, _message(), _context(tmp_path))

    assert R.reply_site_name(reply.content) == "hospital-x"
    error = reply.content.config_records[R.ERROR]
    assert dict(error) == {"code": "E200:DataError"}
    assert "secret-case" not in str(reply.content)


def test_a_site_that_cannot_be_found_still_gets_a_code_only_reply(tmp_path: Path) -> None:
    context = Context(
        run_id=1, node_id=7, node_config={"data_path": "x"}, state=RecordDict(), run_config={}
    )

    def handler(msg: Message, context: Context, cfg: FedsegConfig) -> RecordDict:
        site.resolve_site(context, cfg)  # refuses the misspelt key
        return RecordDict()

    reply = client_app.guarded_reply(handler, _message(), context)

    assert dict(reply.content.config_records[R.ERROR]) == {"code": "E100:ConfigError"}
    assert R.reply_site_name(reply.content) is None
