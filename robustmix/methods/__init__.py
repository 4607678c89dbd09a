"""Methods that need code of their own beyond the shared stages: AWP, BiLAW, CAAT, GAIRAT, SGLR, and the one-step
lookahead (meta-learning) that BiLAW and CAAT share."""
