-- Argo CD health of a Perennial TrainingRun (perennial.ai/v1alpha1).
-- Runs in Argo CD's Lua sandbox without its open libraries: no string.*, no string methods.
-- A run is a one-shot job (its spec is immutable): Succeeded True is Healthy (the Adapter exists),
-- Succeeded False is Degraded (terminal: create a new run), Succeeded Unknown is Progressing
-- (waiting for references such as a parent run, the Job pending, the trainer running).
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
local succeeded = condition("Succeeded")
if succeeded == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Succeeded condition"
  return hs
end
if succeeded.status == "True" then
  hs.status = "Healthy"
  hs.message = text(succeeded)
  return hs
end
if succeeded.status == "False" then
  hs.status = "Degraded"
  hs.message = succeeded.reason .. ": " .. text(succeeded)
  return hs
end
hs.status = "Progressing"
hs.message = text(succeeded)
if obj.status.progressText ~= nil and obj.status.progressText ~= "" then
  hs.message = hs.message .. " (step " .. obj.status.progressText .. ")"
end
return hs
