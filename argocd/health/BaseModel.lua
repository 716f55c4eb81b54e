-- Argo CD health of a Perennial BaseModel (perennial.ai/v1alpha1).
-- The operator writes status.observedGeneration and a Ready condition (reasons: SourceAvailable,
-- Cached; Downloading while the download Job runs; SecretNotFound, SecretKeyMissing, ClaimNotFound,
-- DownloadFailed, InvalidSpec when it cannot work).
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
if ready.reason == "Downloading" then
  hs.status = "Progressing"
else
  hs.status = "Degraded"
end
hs.message = ready.reason .. ": " .. text(ready)
return hs
