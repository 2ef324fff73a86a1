"""The `afkv serve` command as a user runs it: it says where it serves, answers the openai
client, and stops cleanly on Ctrl-C; beyond loopback without a key it refuses before loading."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading

import pytest

import afkv
from afkv.cli import main
from tests.serve.conftest import openai_client


def test_serve_refuses_beyond_loopback_without_a_key(capsys, monkeypatch):
    monkeypatch.setattr(afkv, "Engine", lambda *a, **k: pytest.fail("the engine was loaded"))
    monkeypatch.delenv("AFKV_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "without an API key" in err and "--allow-unauthenticated" in err and "Traceback" not in err


async def test_serve_command(tiny_chat_dir):
    proc = subprocess.Popen([sys.executable, "-m", "afkv.cli", "serve", "--model", str(tiny_chat_dir), "--port", "0",
                             "--served-model-name", "tiny"], stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        url = None
        while url is None:
            line = lines.get(timeout=120)
            if m := re.search(r"serving 'tiny' at (http://127\.0\.0\.1:\d+)/v1", line):
                url = m.group(1)
        client = openai_client(url, api_key="none")
        assert [m.id for m in (await client.models.list()).data] == ["tiny"]
        answer = await client.chat.completions.create(model="tiny", max_tokens=5, temperature=0,
                                                      messages=[{"role": "user", "content": "Hi"}])
        assert answer.usage.completion_tokens >= 1
        await client.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
