"""Serverless deployment at minimum billed cost: prices and limits as data (``prices``)."""
