"""The pure recommendation core of simstream: no Kafka, no gRPC, no JSON."""
