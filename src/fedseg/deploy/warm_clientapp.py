"""The site's long-running ClientApp process: torch, the prepared cases and the model stay loaded.

What Flower 1.41 does by itself (read in its source): a SuperNode started with
``--isolation subprocess`` (the default) runs ``flower-superexec``, which claims each pending
ClientApp task from the SuperNode's Runtime API (``AcquireTask``, polled every
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` seconds) and starts a new ``flwr-clientapp`` process for
it (``flwr/supercore/superexec/executor/subprocess_executor.py``). That process handles exactly
one message and exits (``flwr/supernode/runtime/run_clientapp.py``: ``run_clientapp`` ends in
``flwr_exit``), so every message pays the imports of torch and MONAI, reads the site's cases and
builds the model again. Flower's warm executor pools exist only for its Kubernetes executor and
not for ClientApps (``executor/factory.py``). With ``--isolation process`` the SuperNode starts
nothing: a separately started process must claim the tasks.

This module is that process (``python -m fedseg.deploy.warm_clientapp``, started next to the
SuperNode by ``run-supernode.sh``): it claims ClientApp tasks itself and runs each one the way
``run_clientapp`` does (pull the message, context, run and FAB with the task's token, keep it
alive with task heartbeats, push the reply and the final context), but in this same process, so
Python's module state survives from one message, round and run to the next. ``load_app`` finds
the ClientApp module in ``sys.modules`` after the first message, and the site runtime cache of
:mod:`fedseg.federation.site` (prepared cases and trainer, keyed by data and training
configuration) stays warm. The site's state between rounds still travels in
``context.state`` and its state file, exactly as with a new process per message.

Every message still passes the hospital's app approval (:mod:`fedseg.deploy.approval`): the
FAB's bytes are hashed and looked up in ``approved-apps.txt`` before anything of it is unpacked
or imported, and the list is read again for every message.

A crash of this process (killed, out of memory) must not lose the message it was working on:
Flower marks a message *retrieved* once it is pulled and would answer it only when the task's
token expires (two 30 s heartbeats) with ``CLIENT_APP_CRASHED``. So, before running a message,
the process journals it (token, run, context, the message's object tree and objects: Flower's
own serialisations, never pickle) under ``--journal-dir``; restarted within the token's
lifetime, it finds the journal and runs the same message again with the same token. A message
that already crashed the process :data:`MAX_ATTEMPTS` times is answered with an error instead.
``run-supernode.sh`` restarts this process when it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from fedseg.deploy.approval import APPROVED_APPS_ENV, check_fab, read_approved
from fedseg.errors import AppNotApprovedError, ConfigError, DeploymentError

#: how often the process asks the SuperNode for a new task (seconds)
DEFAULT_POLL = 0.1
#: how many times one message may crash the process before it is answered with an error
MAX_ATTEMPTS = 2
JOURNAL_FILE = "inflight.json"
#: first and longest wait (seconds) before asking again for an object still on its way
PULL_BACKOFF = (0.05, 0.5)
#: how long (seconds) to wait for a message's objects: the SuperNode downloads them within
#: seconds, or gives up and drops the message (a SuperLink that restarted meanwhile); one
#: process serves every message, so it must not wait for that one for Flower's 2 hours
PULL_MAX_SECONDS = 60.0
#: exit code when the SuperNode's Runtime API cannot be reached at start
EXIT_NO_SUPERNODE = 2


class Journal:
    """The message in flight, on disk, so a restarted process can run it again.

    Parameters
    ----------
    folder:
        Where ``inflight.json`` and the message's objects are kept (created; must be writable).

    Raises
    ------
    DeploymentError
        ``folder`` cannot be created or written.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise DeploymentError(
                f"journal folder {self.folder} is not writable ({exc.strerror or exc}): "
                "give --journal-dir a folder this account can write"
            ) from None
        self.path = self.folder / JOURNAL_FILE

    def write(self, entry: dict[str, Any], objects: dict[str, bytes]) -> None:
        """Keep ``entry`` (JSON) and the message's ``objects`` (id -> bytes), atomically."""
        blobs = self.folder / "objects"
        blobs.mkdir(exist_ok=True)
        for object_id, content in objects.items():
            (blobs / object_id).write_bytes(content)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, self.path)

    def read(self) -> tuple[dict[str, Any], Callable[[str], bytes]] | None:
        """The journalled entry and a reader of its objects, or ``None``."""
        if not self.path.is_file():
            return None
        try:
            entry = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.clear()
            return None
        blobs = self.folder / "objects"
        return entry, lambda object_id: (blobs / object_id).read_bytes()

    def bump(self, entry: dict[str, Any]) -> None:
        """Count one more attempt of the journalled message."""
        entry["attempts"] = int(entry.get("attempts", 0)) + 1
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, self.path)

    def clear(self) -> None:
        """Forget the message in flight (its reply was pushed, or it cannot be run again)."""
        self.path.unlink(missing_ok=True)
        blobs = self.folder / "objects"
        if blobs.is_dir():
            for blob in blobs.iterdir():
                blob.unlink(missing_ok=True)


class WarmClientApp:
    """Claims the SuperNode's ClientApp tasks and runs them in this process.

    Parameters
    ----------
    runtime_api_address:
        The SuperNode's Runtime API (``host:port``, its ``--port``).
    journal:
        Where the message in flight is kept (:class:`Journal`).
    approved_list:
        The site's ``approved-apps.txt``; ``None`` refuses every app.
    insecure, root_certificates:
        How to reach the Runtime API (plain HTTP on the loopback by default).
    poll:
        Seconds between two ``AcquireTask`` calls when nothing is pending.
    """

    def __init__(
        self,
        runtime_api_address: str,
        journal: Journal,
        approved_list: str | None,
        *,
        insecure: bool = True,
        root_certificates: bytes | None = None,
        poll: float = DEFAULT_POLL,
    ) -> None:
        self.address = runtime_api_address
        self.journal = journal
        self.approved_list = approved_list
        self.insecure = insecure
        self.root_certificates = root_certificates
        self.poll = poll
        self.handled = 0

    # -- Runtime API clients -------------------------------------------------------------------

    def _client(self, token: str | None, *, retry: bool = True) -> Any:
        """A Runtime API client: with ``token``, a task's (Flower's retries on unless not
        ``retry``); without, the task claimer's (one try per call: the loop tries again)."""
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        name = "flwr-clientapp" if token else "SuperExec"
        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=name)]
        if token:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        invoker = make_simple_http_retry_invoker()
        if not token or not retry:
            invoker.max_tries = 1
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.insecure,
            root_certificates=None if self.insecure else self.root_certificates,
            interceptors=interceptors,
            retry_invoker=invoker,
        )

    def wait_for_supernode(self, timeout: float) -> None:
        """Return once the SuperNode's Runtime API answers.

        Raises
        ------
        DeploymentError
            No answer within ``timeout`` seconds.
        """
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest

        deadline = time.monotonic() + timeout
        client = self._client(None)
        try:
            while True:
                try:
                    client.AcquireTask(AcquireTaskRequest())  # no task types: claims nothing
                    return
                except httpx.HTTPError as exc:
                    if time.monotonic() > deadline:
                        raise DeploymentError(
                            f"the SuperNode's Runtime API at {self.address} does not answer "
                            f"({type(exc).__name__}): start flower-supernode with "
                            "--isolation process --port <this port> first"
                        ) from None
                time.sleep(0.5)
        finally:
            client.close()

    # -- one task ------------------------------------------------------------------------------

    def _check_approved(self, fab: Any) -> None:
        from flwr.supercore import log

        try:
            if not self.approved_list:
                raise ConfigError(f"${APPROVED_APPS_ENV} is not set")
            approved = read_approved(Path(self.approved_list))
        except ConfigError as exc:
            log(ERROR, "fedseg: refusing every app: %s", exc)
            raise AppNotApprovedError(
                "E510:AppNotApprovedError: this site has no readable approved-apps list"
            ) from None
        try:
            digest = check_fab(fab.content, approved, fab.hash_str)
        except AppNotApprovedError as exc:
            log(ERROR, "fedseg: REFUSED app: %s (list: %s)", exc, self.approved_list)
            raise
        log(INFO, "fedseg: app %s approved (%s)", digest[:16], approved[digest] or "no note")

    def _load_app(self, run: Any, fab: Any) -> Any:
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir

        if not get_project_dir(run.fab_id, run.fab_version, fab.hash_str).is_dir():
            install_from_fab(fab.content, skip_prompt=True)
        # load_app imports the module once: later messages reuse sys.modules (the warm state)
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        return load(run.fab_id, run.fab_version, fab.hash_str)

    def run_task(self, token: str, task_id: int, replay: tuple[dict[str, Any], Any] | None) -> None:
        """Run one ClientApp task with ``token``, as Flower's ``run_clientapp`` does.

        ``replay`` is a journalled message to run again after a crash (its entry and object
        reader); otherwise the message is pulled from the SuperNode and journalled first.
        """
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore import log
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supernode.runtime import run_clientapp as flower

        started = time.perf_counter()
        client = self._client(token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        pulled = ran = started
        context = None
        message = None
        reply = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            if replay is None:
                message, context, run, fab = self._pull(client, token, task_id)
            else:
                message, context, run, fab = self._replayed(client, replay)
            pulled = time.perf_counter()
            self._check_approved(fab)
            app = self._load_app(run, fab)
            reply = app(message=message, context=context)
            ran = time.perf_counter()
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 - Flower's own policy: an error reply
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = str(type(exc)) + ":<'" + str(exc) + "'>"
            if isinstance(exc, LoadClientAppError):
                code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                reason = "An exception was raised when attempting to load `ClientApp`"
            log(ERROR, "ClientApp raised an exception", exc_info=exc)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        except BaseException:
            # Stopped (SIGTERM, Ctrl-C) mid-message: the journal keeps it for the next start.
            _stop(heartbeat)
            client.close()
            raise
        try:
            if reply is not None and context is not None:
                flower.push_message(client, reply, context)
            flower.push_task_output(client, context, sub_status, details)
            log(INFO, "fedseg: %s message of run %s: pulled in %.2f s, ran in %.2f s, "
                "replied in %.2f s (process's message %d)",
                message.metadata.message_type if message is not None else "?",
                context.run_id if context is not None else "?", pulled - started,
                ran - pulled, time.perf_counter() - ran, self.handled + 1)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the SuperNode may be gone; keep serving
            log(ERROR, "fedseg: could not push the reply: %s", exc)
        finally:
            self.journal.clear()
            _stop(heartbeat)
            client.close()
        self.handled += 1

    def _pull(self, client: Any, token: str, task_id: int) -> tuple[Any, Any, Any, Any]:
        """``run_clientapp.pull_task_input``, keeping the message's objects for the journal."""
        from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
        from flwr.proto.node_pb2 import Node
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf,
            make_pull_object_fn_protobuf,
        )

        res = client.PullTaskInput(PullTaskInputRequest())
        _identify(res)
        context = context_from_proto(res.context)
        run = run_from_proto(res.run)
        fab = fab_from_proto(res.fab)
        pulled = client.PullMessages(PullAppMessagesRequest())
        if not pulled.messages_list:
            raise RuntimeError("No messages received from Runtime API")
        node = Node(node_id=context.node_id)
        tree = pulled.message_object_trees[0]
        fetch = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)
        objects: dict[str, bytes] = {}

        def pull_object(object_id: str) -> bytes:
            objects[object_id] = fetch(object_id)
            return objects[object_id]

        confirm = make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        )
        message = _inflate(tree, pull_object, confirm)
        entry = {
            "token": token,
            "task-id": task_id,
            "attempts": 1,
            "task-input": res.SerializeToString().hex(),
            "object-tree": tree.SerializeToString().hex(),
        }
        self.journal.write(entry, objects)
        return message, context, run, fab

    def _replayed(self, client: Any, replay: tuple[dict[str, Any], Any]) -> tuple[Any, ...]:
        """The journalled message, context, run and FAB, as first pulled."""
        from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
        from flwr.proto.message_pb2 import ObjectTree
        from flwr.proto.runtime_pb2 import PullTaskInputResponse

        entry, read = replay
        res = PullTaskInputResponse.FromString(bytes.fromhex(entry["task-input"]))
        _identify(res)
        tree = ObjectTree.FromString(bytes.fromhex(entry["object-tree"]))
        message = _inflate(tree, read, lambda _object_id: None)
        del client
        return (
            message,
            context_from_proto(res.context),
            run_from_proto(res.run),
            fab_from_proto(res.fab),
        )

    # -- the loop ------------------------------------------------------------------------------

    def recover(self) -> None:
        """Run again the message a crashed predecessor was working on, if its token lives."""
        from flwr.supercore import log

        replay = self.journal.read()
        if replay is None:
            return
        entry = replay[0]
        attempts = int(entry.get("attempts", 1))
        if attempts >= MAX_ATTEMPTS:
            log(ERROR, "fedseg: the message in flight crashed this process %d times", attempts)
            self._answer_crash(entry, replay)
            return
        if not self._token_alive(str(entry["token"])):
            # the SuperNode restarted too (its state, and the task, are gone): nothing to answer
            log(WARNING, "fedseg: the message a crashed ClientApp left belongs to a previous "
                "SuperNode session; dropped")  # fmt: skip
            self.journal.clear()
            return
        self.journal.bump(entry)
        log(WARNING, "fedseg: running again the message a crashed ClientApp left (task %s)",
            entry.get("task-id"))  # fmt: skip
        try:
            self.run_task(str(entry["token"]), int(entry["task-id"]), replay)
        except Exception as exc:  # noqa: BLE001 - an expired token: Flower answers it itself
            log(ERROR, "fedseg: could not run the journalled message again: %s", exc)
            self.journal.clear()

    def _token_alive(self, token: str) -> bool:
        """Whether the SuperNode still knows the task of ``token`` (one task heartbeat)."""
        import httpx
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

        client = self._client(token, retry=False)
        try:
            return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)
        except httpx.HTTPError:
            return False
        finally:
            client.close()

    def _answer_crash(self, entry: dict[str, Any], replay: tuple[dict[str, Any], Any]) -> None:
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore import log
        from flwr.supernode.runtime import run_clientapp as flower

        client = self._client(str(entry["token"]))
        try:
            message, context, _run, _fab = self._replayed(client, replay)
            reason = "E520:DeploymentError: the site's ClientApp process crashed on this message"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason),
                            reply_to=message)  # fmt: skip
            flower.push_message(client, reply, context)
            flower.push_task_output(client, context, SubStatus.FAILED, reason)
        except Exception as exc:  # noqa: BLE001 - expired token: Flower answers it itself
            log(ERROR, "fedseg: could not answer the crashed message: %s", exc)
        finally:
            self.journal.clear()
            client.close()

    def serve(self, max_tasks: int | None = None) -> None:
        """Claim and run ClientApp tasks until stopped (or ``max_tasks`` have run)."""
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore import log
        from flwr.supercore.constant import TaskType

        try:
            self.recover()
        except Exception as exc:  # noqa: BLE001 - a bad journal must not stop the site
            log(ERROR, "fedseg: could not recover the message in flight: %s", exc)
            self.journal.clear()
        client = self._client(None)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        log(INFO, "fedseg: warm ClientApp serving the SuperNode at %s", self.address)
        try:
            while max_tasks is None or self.handled < max_tasks:
                try:
                    res = client.AcquireTask(request)
                except httpx.HTTPError as exc:  # the SuperNode restarts: wait for it
                    log(WARNING, "fedseg: SuperNode's Runtime API unavailable: %s", exc)
                    time.sleep(1.0)
                    continue
                if res.HasField("task") and res.token:
                    self.run_task(res.token, int(res.task.task_id), None)
                    continue
                time.sleep(self.poll)
        finally:
            client.close()


def _site_log_lines() -> None:
    """fedseg's own informational lines (policy admissions, data prepared, epsilon spent) in
    this process's output, next to Flower's: the hospital's record of what its site did."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)-8s fedseg: %(message)s"))
    root = logging.getLogger("fedseg")
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _identify(res: Any) -> None:
    """Tell Flower which task this process now runs (as ``run_clientapp.pull_task_input``)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id


def _stop(heartbeat: Any) -> None:
    if heartbeat.is_running:
        heartbeat.stop()


def _inflate(tree: Any, pull: Callable[[str], bytes], confirm: Callable[[str], Any]) -> Any:
    from flwr.app import Message
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

    # The SuperNode files the task before it has downloaded the message's objects from the
    # SuperLink (start_client_internal: create_task, then pull_objects), so an object may not be
    # there yet: ask again quickly. Flower's defaults (1 s doubling up to 10 s) suit a new
    # process that starts seconds later; this one claims the task at once.
    message = pull_and_inflate_object_from_tree(
        tree,
        pull,
        confirm,
        return_type=Message,
        initial_backoff=PULL_BACKOFF[0],
        backoff_cap=PULL_BACKOFF[1],
        max_time=PULL_MAX_SECONDS,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message


def supernode_alive(pid: int) -> bool:
    """Whether process ``pid`` is running: gone, or a zombie (exited, not yet reaped by the
    script that started it), is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc here: the signal said it exists
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def watch_supernode(pid: int, interval: float = 0.5, grace: float = 10.0) -> threading.Thread:
    """Stop this process once the SuperNode ``pid`` has exited.

    It sends itself SIGTERM (a clean exit through :func:`_exit_once`) and, should the main
    thread not get to it within ``grace`` seconds (blocked in a call), ends with
    ``os._exit(0)``. Flower's own monitor raises SIGINT instead, which a process that a
    non-interactive shell started in the background (``run-supernode.sh``) ignores: the
    ClientApp then outlived its SuperNode and the script never exited.
    """

    def monitor() -> None:
        while supernode_alive(pid):
            time.sleep(interval)
        print(
            f"fedseg warm ClientApp: the SuperNode (pid {pid}) has exited; stopping",
            file=sys.stderr,
        )
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(0)

    thread = threading.Thread(target=monitor, name="fedseg-supernode-watch", daemon=True)
    thread.start()
    return thread


def _exit_once(*_: Any) -> None:
    """SIGTERM: exit cleanly once. A second SIGTERM (the SuperNode's shutdown sends one, a
    service manager another) would otherwise raise ``SystemExit`` inside the exit handlers
    that are already running and print a traceback into the site's log."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(0)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fedseg.deploy.warm_clientapp",
        description="The site's long-running ClientApp: claims the tasks of a SuperNode started "
        "with --isolation process and runs them in this process (torch, cases and model stay "
        "loaded). Exit codes: 0 stopped, 2 bad option or no SuperNode, 3 internal failure.",
    )
    add = parser.add_argument
    add("--runtime-api-address", default="127.0.0.1:9094", help="the SuperNode's --port")
    add("--journal-dir", required=True, type=Path, help="where the message in flight is kept")
    add("--poll", type=float, default=DEFAULT_POLL, help="seconds between two task requests")
    add("--wait", type=float, default=60.0, help="seconds to wait for the SuperNode at start")
    add("--supernode-pid", type=int, default=None, help="exit when this process is gone")
    add("--root-certificates", type=Path, default=None, help="CA of a TLS Runtime API")
    args = parser.parse_args(argv)
    if not 0.01 <= args.poll <= 60:
        parser.error(f"--poll must be in 0.01..60 seconds, got {args.poll}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Serve until stopped; one clear line and a non-zero exit when it cannot start."""
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _exit_once)
    if args.supernode_pid is not None:  # before waiting for it: it may already have failed
        watch_supernode(args.supernode_pid)
    try:
        journal = Journal(args.journal_dir)
        certs = args.root_certificates.read_bytes() if args.root_certificates else None
        app = WarmClientApp(
            args.runtime_api_address,
            journal,
            os.environ.get(APPROVED_APPS_ENV),
            insecure=certs is None,
            root_certificates=certs,
            poll=args.poll,
        )
        app.wait_for_supernode(args.wait)
    except (DeploymentError, OSError) as exc:
        print(f"fedseg warm ClientApp: {exc}", file=sys.stderr)
        return EXIT_NO_SUPERNODE
    from fedseg.federation.site import serve_many_messages

    serve_many_messages()  # the handshake prepares the site's data (its policy permitting)
    _site_log_lines()
    app.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
