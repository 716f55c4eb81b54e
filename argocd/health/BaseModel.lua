-- Argo CD health of a Perennial BaseModel (perennial.ai/v1alpha1).
-- The operator writes status.observedGeneration and a Ready condition (reasons: SourceAvailable,
-- Cached; Downloading while the download Job runs; SecretNotFound, SecretKeyMissing, ClaimNotFound,
-- DownloadFailed, InvalidSpec when it cannot work).
local ready = condition("Ready")
if ready == nil or ready.status == "Unknown" then
  return set("Progressing", "Waiting for the Ready condition")
end
if ready.status == "True" then
  return set("Healthy", text(ready))
end
if ready.reason == "Downloading" then
  return set("Progressing", why(ready))
end
return set("Degraded", why(ready))
