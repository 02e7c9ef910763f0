"""The only module that knows Incus and pylxd.

Facts it relies on (measured on Incus 6.0 here, see shared/INCUS-NOTES.md):
- pylxd sends only the legacy X-LXD-* file headers, which Incus 7.0.1 and 7.2+ ignore, so every
  request here carries the X-Incus-* names too; modes go as 0-prefixed octal.
- A pylxd Client shares one requests.Session, which is not thread-safe: one pusher per thread.
- A missing instance and a missing parent directory both answer 404; the instance is looked up
  to tell them apart rather than comparing message strings.
- A destination that is a directory answers 500; a GET of the path tells it apart from a real
  server fault.
"""

import os
import posixpath
from typing import IO, Any

import pylxd
import requests
from pylxd.exceptions import ClientConnectionFailed, LXDAPIException, NotFound

from uploads.conf import uploads_settings
from uploads.pushers import PermanentPushError, PushError, PushRequest, TransientPushError

DIR_MODE = 0o755


def _file_headers(
    *, kind: str, mode: int | None, uid: int | None, gid: int | None, write: str | None = None
) -> dict[str, str]:
    values = {"type": kind}
    if write:
        values["write"] = write
    if mode is not None:
        values["mode"] = f"0{mode:o}"
    if uid is not None:
        values["uid"] = str(uid)
    if gid is not None:
        values["gid"] = str(gid)
    headers = {}
    for key, value in values.items():
        headers[f"X-Incus-{key}"] = value
        headers[f"X-LXD-{key}"] = value  # Incus 6.0 LTS also reads these; LXD reads only these.
    return headers


def _status(exc: LXDAPIException) -> int:
    response = getattr(exc, "response", None)
    return int(getattr(response, "status_code", 0) or 0)


class IncusPusher:
    """Pushes files through the Incus API with one pylxd client per pusher (so per thread)."""

    def __init__(self, endpoint: str | None = None, timeout: float | None = None) -> None:
        self.endpoint = endpoint or uploads_settings.INCUS_ENDPOINT
        self.timeout = timeout if timeout is not None else uploads_settings.INCUS_TIMEOUT
        self._client: pylxd.Client | None = None

    # --- connection ---------------------------------------------------------------------

    def client(self) -> pylxd.Client:
        if self._client is None:
            if self.endpoint.startswith("/") and not os.path.exists(self.endpoint):
                raise TransientPushError(
                    f"the Incus socket {self.endpoint} does not exist (is incusd running?)"
                )
            try:
                self._client = pylxd.Client(endpoint=self.endpoint, timeout=self.timeout)
            except (ClientConnectionFailed, requests.RequestException, OSError) as exc:
                raise TransientPushError(
                    f"cannot reach Incus at {self.endpoint}: {exc or type(exc).__name__}"
                ) from exc
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.api.session.close()
            self._client = None

    def check(self) -> str | None:
        try:
            self.client().api.get()
        except TransientPushError as exc:
            return exc.message
        except (LXDAPIException, requests.RequestException, OSError) as exc:
            self.close()
            return f"cannot reach Incus at {self.endpoint}: {exc}"
        return None

    def _instance_api(self, name: str) -> Any:
        return self.client().api.instances[name]

    def instance_exists(self, name: str, project: str) -> bool:
        try:
            self._instance_api(name).get(params={"project": project})
        except NotFound:
            return False
        return True

    # --- pushing ------------------------------------------------------------------------

    def push(self, request: PushRequest) -> None:
        try:
            self._push(request)
        except PushError:
            raise
        except (requests.ConnectionError, requests.Timeout, ConnectionError) as exc:
            # A broken connection leaves the session in an unknown state: start afresh.
            self.close()
            raise TransientPushError(
                f"connection to Incus failed: {exc or type(exc).__name__}"
            ) from exc
        except requests.RequestException as exc:
            self.close()
            raise TransientPushError(f"request to Incus failed: {exc}") from exc

    def _push(self, req: PushRequest) -> None:
        where = f"{req.instance}"
        with open(req.source, "rb") as body:
            try:
                self._post_file(req, body)
                return
            except NotFound as exc:
                if not self.instance_exists(req.instance, req.project):
                    raise PermanentPushError(
                        f"instance '{req.instance}' not found in project '{req.project}'"
                    ) from exc
                parent = posixpath.dirname(req.path)
                if not req.create_dirs:
                    raise PermanentPushError(
                        f"parent directory {parent} does not exist in {where} (set create_dirs)"
                    ) from exc
            except LXDAPIException as exc:
                raise self._classify(req, exc) from exc
            self._make_parents(req)
            body.seek(0)
            try:
                self._post_file(req, body)
            except LXDAPIException as exc:
                raise self._classify(req, exc) from exc

    def _post_file(self, req: PushRequest, body: IO[bytes]) -> None:
        headers = _file_headers(
            kind="file", mode=req.mode, uid=req.uid, gid=req.gid, write="overwrite"
        )
        headers["Content-Type"] = "application/octet-stream"
        headers["Content-Length"] = str(req.size)
        self._instance_api(req.instance).files.post(
            params={"path": req.path, "project": req.project}, data=body, headers=headers
        )

    def _make_parents(self, req: PushRequest) -> None:
        """Create each missing parent (0755, owned like the file), like `incus file push -p`."""
        parts = [p for p in posixpath.dirname(req.path).split("/") if p]
        current = ""
        for part in parts:
            current = f"{current}/{part}"
            headers = _file_headers(kind="directory", mode=DIR_MODE, uid=req.uid, gid=req.gid)
            try:
                self._instance_api(req.instance).files.post(
                    params={"path": current, "project": req.project}, headers=headers
                )
            except LXDAPIException as exc:
                raise self._classify(req, exc, path=current) from exc

    def _is_directory(self, req: PushRequest, path: str) -> bool:
        try:
            response = self._instance_api(req.instance).files.get(
                params={"path": path, "project": req.project}, is_api=False, stream=True
            )
        except LXDAPIException:
            return False
        with response:
            kind = response.headers.get("X-Incus-Type") or response.headers.get("X-LXD-Type")
        return kind == "directory"

    def _classify(
        self, req: PushRequest, exc: LXDAPIException, path: str | None = None
    ) -> PushError:
        path = path or req.path
        code = _status(exc)
        detail = str(exc)
        if code == 404:
            return PermanentPushError(f"{path} not found in {req.instance}: {detail}")
        if code == 403:
            return PermanentPushError(
                f"permission denied writing {path} in {req.instance}: {detail}"
            )
        if code == 400:
            return PermanentPushError(f"Incus refused the request for {path}: {detail}")
        if code >= 500 and self._is_directory(req, path):
            return PermanentPushError(f"{path} is a directory in {req.instance}")
        if code == 503:
            return TransientPushError(f"Incus is not ready (503): {detail}")
        return TransientPushError(f"Incus answered {code or 'an error'} for {path}: {detail}")
