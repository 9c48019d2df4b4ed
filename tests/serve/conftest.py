"""Serving fixtures: a tiny fused model with a non-uniform gate, and real uvicorn servers on 127.0.0.1.

Servers run in a thread of the test process (one per app; each app has its own engine thread) on a socket
bound to a free port; the subprocess test (test_shutdown.py) starts `ultrafuser serve` itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from liveserver import MODEL_NAME, LiveServer


@pytest.fixture(scope="session")
def fused_dir(tiny_dir, tmp_path_factory) -> Path:
    """text + code + math specialists, learned gate with random (not zero) last layer so routing varies per token."""
    from ultrafuser.cli import main
    from ultrafuser.modeling.fused import FusedModel

    out = tmp_path_factory.mktemp("serve") / MODEL_NAME
    rc = main(["fuse", "--specialist", f"text={tiny_dir['text']}", "--specialist", f"code={tiny_dir['code']}",
               "--specialist", f"math={tiny_dir['math']}", "--gate", "learned", "--out", str(out)])
    assert rc == 0
    model = FusedModel.from_pretrained(out)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for p in model.gate.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def fused_model(fused_dir):
    from ultrafuser.modeling.fused import FusedModel

    return FusedModel.from_pretrained(fused_dir)


@pytest.fixture
def make_server(fused_model):
    """make_server(**create_app kwargs) -> LiveServer; all stopped at the end of the test."""
    from ultrafuser.serve.app import create_app

    servers: list[LiveServer] = []

    def make(**kwargs) -> LiveServer:
        kwargs.setdefault("model_name", MODEL_NAME)
        kwargs.setdefault("threads", 1)
        s = LiveServer(create_app(fused_model, **kwargs))
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture(scope="module")
def server(fused_model):
    """A default server shared by a module's tests (API key off)."""
    from ultrafuser.serve.app import create_app

    s = LiveServer(create_app(fused_model, model_name=MODEL_NAME, threads=1))
    yield s
    s.close()


@pytest.fixture
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
