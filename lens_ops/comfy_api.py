"""A small client for a running ComfyUI server's HTTP + websocket API (no ComfyUI import: it talks to
the server). Used by `lora-lens queue`; ComfyUI itself is the engine that scales out."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import uuid

from .errors import LensError


class ServerGone(Exception):
    """The server did not answer (down, restarting, unreachable)."""


class ComfyClient:
    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            self.url = "http://" + self.url
        self.timeout = timeout
        self.client_id = str(uuid.uuid4())
        self.alive = True

    def _req(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read()
                return json.loads(raw) if raw else {}
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read() or b"{}")
            except json.JSONDecodeError:
                detail = {}
            if e.code == 400:
                raise LensError(f"{self.url} refused the prompt: {_explain(detail)}") from None
            raise ServerGone(f"{self.url} answered HTTP {e.code}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            raise ServerGone(f"{self.url} did not answer ({e})") from None

    def queue_remaining(self) -> int:
        return int(self._req("GET", "/prompt").get("exec_info", {}).get("queue_remaining", 0))

    def submit(self, prompt: dict) -> str:
        return self._req("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self._req("GET", f"/history/{prompt_id}").get(prompt_id)

    def object_info(self, node: str | None = None) -> dict:
        return self._req("GET", "/object_info" + (f"/{node}" if node else ""))

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Interrupt `prompt_id` only if it is the one running (never someone else's work)."""
        self._req("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def delete(self, prompt_ids: list[str]) -> None:
        if prompt_ids:
            self._req("POST", "/queue", {"delete": list(prompt_ids)})

    def listen(self, on_event, stop: threading.Event) -> threading.Thread:
        """Follow the server's websocket in a thread; on_event(self, message dict) for each JSON message."""
        def loop():
            try:
                import websocket  # websocket-client
            except ImportError:
                return  # progress then comes from polling /history only
            ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
            while not stop.is_set():
                try:
                    ws = websocket.create_connection(ws_url, timeout=2)
                except Exception:
                    if stop.wait(1.0):
                        return
                    continue
                try:
                    while not stop.is_set():
                        try:
                            msg = ws.recv()
                        except websocket.WebSocketTimeoutException:
                            continue
                        if isinstance(msg, str):
                            try:
                                on_event(self, json.loads(msg))
                            except json.JSONDecodeError:
                                pass
                except Exception:
                    pass
                finally:
                    try:
                        ws.close()
                    except Exception:
                        pass
        t = threading.Thread(target=loop, daemon=True)
        t.start()
        return t


def _explain(detail: dict) -> str:
    err = detail.get("error", {})
    parts = [err.get("message", "") + (": " + err.get("details", "") if err.get("details") else "")]
    for nid, ne in (detail.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            parts.append(f"node {nid} ({ne.get('class_type')}): {e.get('message')} {e.get('details', '')}".strip())
    return "; ".join(p for p in parts if p) or "invalid prompt"


def outputs_of(entry: dict) -> tuple[list[str], list[str]]:
    """(output files, report texts) from a /history entry's node outputs."""
    files, texts = [], []
    for out in (entry or {}).get("outputs", {}).values():
        for key, items in out.items():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item:
                    files.append("/".join(x for x in (item.get("subfolder"), item["filename"]) if x))
                elif isinstance(item, str) and key in ("text", "report", "summary"):
                    texts.append(item)
    return files, texts
