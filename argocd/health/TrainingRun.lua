-- Argo CD health of a Perennial TrainingRun (perennial.ai/v1alpha1).
-- A run is a one-shot job (its spec is immutable): Succeeded True is Healthy (the Adapter exists),
-- Succeeded False is Degraded (terminal: create a new run), Succeeded Unknown is Progressing
-- (waiting for references such as a parent run, the Job pending, the trainer running).
local succeeded = condition("Succeeded")
if succeeded == nil then
  return set("Progressing", "Waiting for the Succeeded condition")
end
if succeeded.status == "True" then
  return set("Healthy", text(succeeded))
end
if succeeded.status == "False" then
  return set("Degraded", why(succeeded))
end
hs.status = "Progressing"
hs.message = text(succeeded)
if obj.status.progressText ~= nil and obj.status.progressText ~= "" then
  hs.message = hs.message .. " (step " .. obj.status.progressText .. ")"
end
return hs
