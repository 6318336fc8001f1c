"""tolgate_flows: conditional continuous normalizing flows (CNF, CCNF, InfoCNF) built on tolgate."""
