"""The Street View client's defaults that src.download's flags name, importable without aiohttp or pandas
(so --help and flag errors stay instant); `src.collect.streetview` uses them."""

DEFAULT_API_URL = "https://maps.googleapis.com/maps/api/streetview"
KEY_ENV = "STREETVIEW_API_KEY"
DUPLICATE_M = 5.0  # panoramas closer than this are the same place
