"""The B-scan classifier: networks (``nets``), model folders and ids (``files``), scoring
(``classify``) and Layer-wise Relevance Propagation (``explain``). torch lives here and in
``segment.sam``; tensors do not leave this package."""
