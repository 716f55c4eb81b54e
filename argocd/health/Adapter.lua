-- Argo CD health of a Perennial Adapter (perennial.ai/v1alpha1).
-- The operator writes Ready (Available; False: InvalidSpec, LineageBroken, ArtifactNotFound),
-- ArtifactAvailable and LineageConsistent. An artifact the operator cannot read (NotVerifiable)
-- still serves: Ready stays True.
local ready = condition("Ready")
if ready == nil or ready.status == "Unknown" then
  return set("Progressing", "Waiting for the Ready condition")
end
if ready.status == "True" then
  return set("Healthy", text(ready))
end
return set("Degraded", why(ready))
