"""Pure domain logic: spec, sky geometry, focal planes, surveys, partition, assignment, overlaps,
transfer planning. Imports neither Prefect nor any service client and does no I/O beyond parsing
the text it is given."""
