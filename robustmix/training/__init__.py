"""The Accelerate training loop and what it needs: data order and seeding, the non-finite guard, the metrics window,
buffer synchronisation, the console log and the training curves."""
