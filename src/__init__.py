"""Image geolocation in Croatia from four Street View views (LUMEN Data Science 2022)."""
