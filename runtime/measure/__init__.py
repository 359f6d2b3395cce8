"""runtime/measure/: Measuring: device profiles, calibration of predicted step times, importance scores."""
