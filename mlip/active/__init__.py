"""Active learning: explore with MD, select uncertain structures, label them with an ASE oracle, retrain."""
