-- Runs in Argo CD's Lua sandbox without its open libraries: no string.*, no string methods.
-- The part every kind shares (argocd/health/prelude.lua): a condition by type, a condition's text, and
-- Progressing until the operator has written a status for the object's latest generation.
local hs = {}
local function condition(ctype)
  if obj.status ~= nil and obj.status.conditions ~= nil then
    for _, c in ipairs(obj.status.conditions) do
      if c.type == ctype then
        return c
      end
    end
  end
  return nil
end
local function text(c)
  if c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return c.reason or ""
end
local function why(c)
  return c.reason .. ": " .. text(c)
end
local function set(status, message)
  hs.status = status
  hs.message = message
  return hs
end

if obj.status == nil or obj.status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report a status"
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end
