-- Argo CD health of a Perennial RewardSpec (perennial.ai/v1alpha1).
-- Runs in Argo CD's Lua sandbox without its open libraries: no string.*, no string methods.
-- The operator writes a Ready condition (static validation of the graders: Valid; InvalidSpec,
-- InvalidGrader, SecretNotAllowed) and a Validated condition (the rubric's self-tests in a Job:
-- TestsPassed, NoTests; Unknown ValidationRunning; False TestsFailed, ValidationJobFailed).
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
local ready = condition("Ready")
if ready == nil or ready.status == "Unknown" then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end
if ready.status == "False" then
  hs.status = "Degraded"
  hs.message = ready.reason .. ": " .. text(ready)
  return hs
end
local validated = condition("Validated")
if validated == nil or validated.status == "Unknown" then
  hs.status = "Progressing"
  if validated ~= nil then
    hs.message = text(validated)
  else
    hs.message = "Waiting for the rubric's tests to run"
  end
  return hs
end
if validated.status == "False" then
  hs.status = "Degraded"
  hs.message = validated.reason .. ": " .. text(validated)
  return hs
end
hs.status = "Healthy"
hs.message = text(validated)
return hs
