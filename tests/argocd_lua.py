"""Run Perennial's Argo CD Lua (health checks, resource actions) as Argo CD does.

Argo CD (gopher-lua, Lua 5.1) runs a health script or an action with the object in the global `obj` and takes
what it returns: a table `{status=..., message=...}` for health, the modified object for an action, a table of
`{name = {disabled = bool}}` for action discovery. Scripts configured in `argocd-cm` run without Argo CD's "open
libraries" unless `resource.customizations.useOpenLibs.<group>_<kind>` is set: only the base library, `table` and a
safe `os` are there; no `string` library and no string methods (`s:find`). The sandbox below is the same, so a
script that leans on `string` fails here as it would in Argo CD.

The interpreter is real Lua 5.1 (`lupa.lua51`, the C Lua that lupa bundles), not a re-implementation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

try:
    from lupa import lua51
except ImportError as exc:  # pragma: no cover - the dev extra installs it
    raise ImportError("the Argo CD Lua tests need `lupa` (pip install -e '.[dev]'): " + str(exc)) from exc

ROOT = Path(__file__).resolve().parents[1]
CUSTOMIZATIONS = ROOT / "argocd" / "resource_customizations"
GROUP = "perennial.ai"
KINDS = ("BaseModel", "RewardSpec", "TrainingRun", "Adapter", "Deployment")

# The sandbox: Argo CD's libraries without useOpenLibs (base, table, safe os); string methods switched off for
# the run of the script (gopher-lua gives strings no metatable when the string library is not opened).
_RUNNER = """
local source, name, obj = ...
local chunk, err = loadstring(source, name)
if chunk == nil then error(err) end
local env = {
  obj = obj, assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs, pcall = pcall,
  rawequal = rawequal, rawget = rawget, rawset = rawset, select = select, setmetatable = setmetatable,
  getmetatable = getmetatable, tonumber = tonumber, tostring = tostring, type = type, unpack = unpack,
  xpcall = xpcall, table = table,
  os = {time = os.time, date = os.date, clock = os.clock, difftime = os.difftime},
}
setfenv(chunk, env)
local mt = debug.getmetatable("")
local index = mt.__index
mt.__index = nil
local ok, result = pcall(chunk)
mt.__index = index
if not ok then error(result) end
return result
"""


def _clean(value: Any) -> Any:
    """JSON as Argo CD hands it to Lua: null fields are absent."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_clean(v) for v in value if v is not None]
    return value


def _to_python(value: Any) -> Any:
    if lua51.lua_type(value) != "table":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    keys = list(value.keys())
    if keys and all(isinstance(k, (int, float)) for k in keys) and sorted(int(k) for k in keys) == list(range(1, len(keys) + 1)):
        return [_to_python(value[i]) for i in range(1, len(keys) + 1)]
    return {str(k): _to_python(value[k]) for k in keys}


def run_lua(script: Path, obj: dict[str, Any]) -> Any:
    """Run `script` with `obj` as Argo CD does; the returned value as Python (tables as dicts/lists)."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=False)
    runner = lua.execute("return function(...) " + _RUNNER + " end")
    table = lua.table_from(_clean(obj), recursive=True)
    return _to_python(runner(script.read_text(), "@" + str(script.relative_to(ROOT)), table))


def health(kind: str, obj: dict[str, Any]) -> dict[str, str]:
    result = run_lua(CUSTOMIZATIONS / GROUP / kind / "health.lua", obj)
    assert isinstance(result, dict) and set(result) <= {"status", "message"}, result
    return result


def discover_actions(kind: str, obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return run_lua(CUSTOMIZATIONS / GROUP / kind / "actions" / "discovery.lua", obj)


def _restore_empty_lists(new: Any, old: Any) -> Any:
    """An empty Lua table has no shape: where the input held an empty list, the output's empty table is one
    (Argo CD's `cleanReturnedObj` does the same before it computes the patch)."""
    if isinstance(new, dict) and isinstance(old, dict):
        return {k: _restore_empty_lists(v, old.get(k)) for k, v in new.items()}
    if isinstance(new, dict) and not new and isinstance(old, list) and not old:
        return []
    if isinstance(new, list) and isinstance(old, list):
        return [_restore_empty_lists(n, o) for n, o in zip(new, old)] + new[len(old):]
    return new


def run_action(kind: str, action: str, obj: dict[str, Any]) -> dict[str, Any]:
    """An action's result: the modified object."""
    return _restore_empty_lists(run_lua(CUSTOMIZATIONS / GROUP / kind / "actions" / action / "action.lua", obj), _clean(obj))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())
