"""``hf://`` sources without a network: a quick, clear answer instead of huggingface_hub's
~25-50 s of retries; a cached copy is still used. No test here touches the real network: the Hub
endpoint points at a closed local port, or the connection is made to hang."""

from __future__ import annotations

import socket
import time

import pytest
from comfyui_sundae.sundae_lib import _helpers

hf_constants = pytest.importorskip("huggingface_hub.constants")


@pytest.fixture()
def dead_hub(tmp_path, monkeypatch):
    """Online mode, an empty cache, and a Hub endpoint on a local port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(_helpers, "_hf_probe", None, raising=False)
    return tmp_path / "hub"


def test_unreachable_hub_fails_fast_with_what_to_do(dead_hub):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        _helpers.hf_download("someone/model", "prior.safetensors")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "cannot be reached" in message and "not in the local cache" in message
    assert "HF_HUB_OFFLINE=1" in message and "huggingface-cli download someone/model prior.safetensors" in message


def test_a_silent_network_is_bounded_by_the_probe_timeout(dead_hub, monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(30)
        raise OSError("never answered")

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(_helpers, "HF_PROBE_TIMEOUT_S", 0.5)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"did not answer within 0.5 s"):
        _helpers.hf_download("someone/model", "prior.safetensors")
    assert time.monotonic() - start < 5


def test_cached_file_is_used_when_the_hub_is_unreachable(dead_hub):
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = dead_hub / "models--someone--model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "snapshots" / revision / "prior.safetensors").write_bytes(b"cached")
    start = time.monotonic()
    path = _helpers.hf_download("someone/model", "prior.safetensors")
    assert time.monotonic() - start < 10
    assert path.read_bytes() == b"cached"
