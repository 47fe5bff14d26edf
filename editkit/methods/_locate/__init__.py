"""The locate-then-edit steps that ROME, MEMIT and AlphaEdit share (private).

- ``templates``: context prefixes sampled from the model (ROME §3.1);
- ``keys``: the key at the edited token, averaged over prefixes (ROME eq. 3);
- ``values``: the v*/z optimisation (ROME eq. 4, MEMIT eq. 16) on the upper layers only.
"""
