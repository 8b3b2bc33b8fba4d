"""The bridge's Blynk clients: device HTTPS API (``client``), platform API (``platform``)."""
