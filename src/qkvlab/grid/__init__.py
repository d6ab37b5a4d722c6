"""The grid layer: run a grid of settings × seeds to completion across interruptions (:mod:`.runner`),
read and run training-run folders for it (:mod:`.training`), and ``qkvlab sweep`` on top (:mod:`.sweep`).
Claims (:mod:`qkvlab.repro`) and the report build on it; it imports neither."""
