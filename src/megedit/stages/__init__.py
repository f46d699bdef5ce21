"""The four MeG stages: A fit_neurons, B encoder, C router, D generator."""
