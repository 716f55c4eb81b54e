"""Fixtures for the server image: a tiny offline model with two LoRA adapters,
the CPU engine and the feedback sidecar running in background threads."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for tinymodel

from srvutil import TOKEN, AppThread, make_adapter  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tinymodel import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    base = build_tiny_model(root / "base")
    return {
        "base": base,
        "adapters": {"fruit-a": make_adapter(base, root / "lora-a", 1), "fruit-b": make_adapter(base, root / "lora-b", 2)},
    }


@pytest.fixture(scope="session")
def engine(tiny_model: dict):
    from perennial_server.engine import Engine, EngineServer

    eng = Engine(tiny_model["base"], "tiny-base", list(tiny_model["adapters"].items()))
    t = AppThread(lambda: EngineServer(eng).make_app()).start()
    yield t
    t.stop()
    eng.shutdown()


@pytest.fixture
def sidecar_factory(tmp_path: Path):
    from perennial_server.config import SidecarConfig
    from perennial_server.sidecar import Sidecar

    started: list[AppThread] = []

    def make(upstream: str, app_hook: Callable[[Any], None] | None = None, **overrides: Any) -> tuple[AppThread, Sidecar, SidecarConfig]:
        """A running sidecar in front of `upstream`; `app_hook(app)` may add to its aiohttp app before it starts."""
        n = len(started)
        token_file = tmp_path / "secret" / "token"  # a folder of its own, as the pod mounts the Secret
        if not token_file.exists():
            token_file.parent.mkdir(exist_ok=True)
            token_file.write_text(TOKEN + "\n")
        cfg = SidecarConfig(
            upstream=upstream, host="127.0.0.1", port=0, deployment="demo", namespace="ns", revision="blue", region="eu",
            pod="demo-pod-1", base_model_name="tiny-base", spool_dir=str(tmp_path / f"spool{n}"), store_uri=str(tmp_path / f"store{n}"),
            token_file=str(token_file), segment_max_age_s=0.5, ship_interval_s=0.2, rate_limit_per_second=1000,
        )
        for k, v in overrides.items():
            setattr(cfg, k, v)
        sc = Sidecar(cfg)

        def make_app() -> Any:
            app = sc.make_app()
            if app_hook is not None:
                app_hook(app)
            return app

        # served as in the pod (api_server.serve): the client port and the admin port (/metrics, /perennial/routes)
        t = AppThread(make_app, runner=sc.runner, admin=sc.make_admin_app).start()
        started.append(t)
        return t, sc, cfg

    yield make
    for t in started:
        t.stop()


@pytest.fixture
def fake() -> Any:
    """A fake engine speaking vLLM's adapter API (routesutil.FakeEngine)."""
    from routesutil import FakeEngine

    e = FakeEngine()
    yield e
    e.stop()


@pytest.fixture
def routed(fake: Any, sidecar_factory: Callable[..., Any], tmp_path: Path) -> Callable[..., Any]:
    """start(doc or None, **config) -> (sidecar thread, Sidecar, kubelet dir): a sidecar in front of `fake`
    routing from a mounted routes file (routesutil.KubeletDir)."""
    from routesutil import KubeletDir

    made: list[Any] = []

    def start(first: dict | None, **overrides: Any) -> tuple[Any, Any, Any]:
        kd = KubeletDir(tmp_path / ("configmap" + (str(len(made)) if made else "")))
        made.append(kd)
        if first is not None:
            kd.write(first)
        overrides.setdefault("adapter_roots", str(tmp_path / "artifacts"))  # where routesutil.make_adapter_dir puts them
        t, sc, _ = sidecar_factory(fake.url, routes_file=str(kd.path), adapters_dir=str(tmp_path / "adapters"), **overrides)
        return t, sc, kd

    return start


@pytest.fixture
def routed_admin(sidecar_factory: Callable[..., Any], tmp_path: Path) -> Callable[..., Any]:
    """start(engine url, **config) -> a sidecar thread with routes (an empty routes document) and its admin port."""
    from routesutil import KubeletDir

    def start(upstream: str, **overrides: Any) -> Any:
        kd = KubeletDir(tmp_path / "configmap-admin")
        kd.write({"revision": "r0", "base": {"name": "tiny-base"}, "adapters": {}, "routes": {}})
        t, _, _ = sidecar_factory(upstream, routes_file=str(kd.path), adapters_dir=str(tmp_path / "adapters"), **overrides)
        return t

    return start
