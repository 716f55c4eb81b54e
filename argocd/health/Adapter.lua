-- Argo CD health of a Perennial Adapter (perennial.ai/v1alpha1).
-- The operator writes Ready (Available; False: InvalidSpec, LineageBroken, ArtifactNotFound),
-- ArtifactAvailable and LineageConsistent. An artifact the operator cannot read (NotVerifiable)
-- still serves: Ready stays True.
local ready = condition("Ready")
if ready == nil or ready.status == "Unknown" then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = text(ready)
  return hs
end
hs.status = "Degraded"
hs.message = ready.reason .. ": " .. text(ready)
return hs
