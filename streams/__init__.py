"""The Kafka side of simstream: settings, wire records, the Faust app and the CLI."""
