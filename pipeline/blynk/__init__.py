"""The bridge's Blynk clients: device HTTPS API (:mod:`.client`) and platform API (:mod:`.platform`)."""
