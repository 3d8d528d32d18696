"""Secured deployments: `tomtit deploy init` writes a CA, Mosquitto configs (TLS, passwords,
per-identity ACLs, bridges from edge brokers to the cloud's) and one credential file per cloud,
edge, device and monitor; `load_credentials` reads one back for `--credentials`.

Import from the submodules; this package's __init__ stays import-free so loading credentials on a
board does not pull in `cryptography`'s X.509 stack:
  - topology:       Topology, load_topology, topology_from_counts;
  - credentials:    Credentials, load_credentials;
  - init:           init_deployment (writes the folder);
  - pki, mosquitto_conf: the keys and certificates, the Mosquitto files.
"""
