"""Adapters that put boxes behind other frameworks' interfaces. Each needs its own extra
(``pip install 'boxlite[NAME]'``) and is imported only when used: ``import boxlite`` loads
none of them."""
