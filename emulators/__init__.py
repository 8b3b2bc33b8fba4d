"""Local stand-ins for Blynk, The Things Stack and Particle, faithful to ``docs/reference``."""
