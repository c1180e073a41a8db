"""Shipping the spool's events: CloudWatch Logs batches and the cursor that makes them safe."""
