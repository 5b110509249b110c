"""Spread one prompt per LoRA over several ComfyUI servers and follow them to the end.

Each prompt goes to the live server with the shortest queue (its queue length plus what we already
sent it), with at most `per_server` of ours waiting there, so faster servers take more. Completion comes
from the websocket (`execution_success`/`execution_error`) with /history polling as the fallback; a
prompt whose server went away is sent again to another server. ComfyUI does the scaling; this only
chooses where each prompt goes.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from .comfy_api import ComfyClient, ServerGone, outputs_of
from .errors import LensError


@dataclass
class Job:
    name: str
    prompt: dict
    status: str = "pending"          # pending, queued, success, error, cancelled
    server: str | None = None
    prompt_id: str | None = None
    attempts: int = 0
    files: list = field(default_factory=list)
    reports: list = field(default_factory=list)
    error: str | None = None
    seconds: float | None = None
    _sent: float = 0.0

    def summary(self) -> dict:
        return {"lora": self.name, "status": self.status, "server": self.server, "prompt_id": self.prompt_id,
                "attempts": self.attempts, "output_files": self.files, "report": self.reports,
                "error": self.error, "seconds": self.seconds}


class QueueRunner:
    def __init__(self, clients: list[ComfyClient], jobs: list[Job], per_server: int = 2, retries: int = 2,
                 progress=None, poll_seconds: float = 2.0):
        if not clients:
            raise LensError("Give at least one --server.")
        self.clients, self.jobs = clients, jobs
        self.per_server, self.retries = per_server, retries
        self.progress, self.poll = progress, poll_seconds
        self.events: queue.Queue = queue.Queue()
        self.stop = threading.Event()

    # ------------------------------------------------------------------ helpers
    def _inflight(self, c: ComfyClient) -> list[Job]:
        return [j for j in self.jobs if j.status == "queued" and j.server == c.url]

    def _server_gone(self, c: ComfyClient) -> None:
        c.alive = False
        for j in self._inflight(c):
            j.status, j.server, j.prompt_id = "pending", None, None
            if j.attempts > self.retries:
                j.status, j.error = "error", f"gave up after {j.attempts} servers went away"

    def _dispatch(self) -> None:
        for job in [j for j in self.jobs if j.status == "pending"]:
            candidates = []
            for c in self.clients:
                if not c.alive or len(self._inflight(c)) >= self.per_server:
                    continue
                try:
                    candidates.append((c.queue_remaining() + len(self._inflight(c)), c))
                except ServerGone:
                    self._server_gone(c)
            if not candidates:
                return
            _, c = min(candidates, key=lambda x: x[0])
            job.attempts += 1
            try:
                job.prompt_id = c.submit(job.prompt)
                job.status, job.server, job._sent = "queued", c.url, time.monotonic()
            except ServerGone:
                self._server_gone(c)
                job.status = "pending" if job.attempts <= self.retries else "error"
                if job.status == "error":
                    job.error = "no server accepted the prompt"
            except LensError as e:
                job.status, job.error, job.server = "error", str(e), c.url

    def _check(self, job: Job) -> None:
        c = next(c for c in self.clients if c.url == job.server)
        try:
            entry = c.history(job.prompt_id)
        except ServerGone:
            self._server_gone(c)
            return
        if not entry or entry.get("status", {}).get("completed") is None:
            return
        st = entry["status"]
        job.seconds = round(time.monotonic() - job._sent, 2)
        job.files, job.reports = outputs_of(entry)
        if st.get("status_str") == "success" and st.get("completed"):
            job.status = "success"
        else:
            job.status = "error"
            msgs = [m[1] for m in st.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
            job.error = "; ".join(f"{m.get('node_type', '')}: {m.get('exception_message', 'interrupted')}"
                                  for m in msgs) or "failed"

    def _on_event(self, client, msg: dict) -> None:
        if msg.get("type") in ("execution_success", "execution_error", "execution_interrupted", "executed"):
            self.events.put(msg.get("data", {}).get("prompt_id"))

    # ------------------------------------------------------------------ main loop
    def run(self) -> list[Job]:
        for c in self.clients:
            c.listen(self._on_event, self.stop)
        last_poll = 0.0
        try:
            while True:
                self._dispatch()
                open_jobs = [j for j in self.jobs if j.status in ("pending", "queued")]
                if not open_jobs:
                    break
                if not any(c.alive for c in self.clients):
                    for j in open_jobs:
                        j.status, j.error = "error", "every server went away"
                    break
                try:
                    pid = self.events.get(timeout=0.5)
                except queue.Empty:
                    pid = None
                now = time.monotonic()
                for j in [j for j in self.jobs if j.status == "queued"]:
                    if j.prompt_id == pid or now - last_poll >= self.poll:
                        self._check(j)
                if now - last_poll >= self.poll:
                    last_poll = now
                if self.progress:
                    done = sum(j.status in ("success", "error") for j in self.jobs)
                    self.progress(done, len(self.jobs))
        finally:
            self.stop.set()
        if self.progress:
            self.progress(len(self.jobs), len(self.jobs))
        return self.jobs

    def cancel(self) -> None:
        """Ctrl-C: drop our waiting prompts from every queue and interrupt ours that are running."""
        self.stop.set()
        for c in self.clients:
            mine = self._inflight(c)
            if not c.alive or not mine:
                continue
            try:
                c.delete([j.prompt_id for j in mine])
                for j in mine:
                    c.interrupt(j.prompt_id)
            except (ServerGone, LensError):
                pass
        for j in self.jobs:
            if j.status in ("pending", "queued"):
                j.status, j.error = "cancelled", "cancelled by the user"
