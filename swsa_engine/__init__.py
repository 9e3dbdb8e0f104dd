"""swsa_engine: pure array functions for SWSA scoring (detectors, metrics, selection, statistics)."""
