"""Example projections shipped with rehydrate: the order domain the demo replays."""
