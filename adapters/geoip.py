"""Location from IP: a reader of MaxMind-format (``.mmdb``) City databases.

Production points ``MERGETAG_GEOIP_DATABASE`` at a GeoLite2/GeoIP2 City file;
without one, location enrichment is off and says so once in the log. Tests and
local runs use a small database built here from documentation-range networks.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any, Protocol

import maxminddb

log = logging.getLogger(__name__)

# Documentation and MaxMind test networks: never real customers.
TEST_NETWORKS = {
    "81.2.69.0/24": {"country": {"iso_code": "GB"}, "city": {"names": {"en": "London"}}, "location": {"time_zone": "Europe/London"}},
    "192.0.2.0/24": {"country": {"iso_code": "NO"}, "city": {"names": {"en": "Oslo"}}, "location": {"time_zone": "Europe/Oslo"}},
    "198.51.100.0/24": {"country": {"iso_code": "US"}, "city": {"names": {"en": "Denver"}}, "location": {"time_zone": "America/Denver"}},
    "2001:db8::/32": {"country": {"iso_code": "JP"}, "city": {"names": {"en": "Tokyo"}}, "location": {"time_zone": "Asia/Tokyo"}},
}


class GeoReader(Protocol):
    def get(self, ip: str) -> Any: ...


def open_reader(path: str | None) -> GeoReader | None:
    if not path:
        log.info("no GeoIP database configured (MERGETAG_GEOIP_DATABASE): location enrichment is off")
        return None
    if not Path(path).exists():
        log.warning("GeoIP database %s not found: location enrichment is off", path)
        return None
    return maxminddb.open_database(path)


def geo_traits(ip: str | None, reader: GeoReader | None) -> dict[str, str]:
    """Country, city and time zone for ``ip``; empty when unknown. The IP itself is never kept."""
    if not ip or reader is None:
        return {}
    try:
        ipaddress.ip_address(ip)
        record = reader.get(ip)
    except ValueError:
        return {}
    if not isinstance(record, dict):
        return {}
    found = {
        "geo_country": (record.get("country") or {}).get("iso_code"),
        "geo_city": ((record.get("city") or {}).get("names") or {}).get("en"),
        "geo_timezone": (record.get("location") or {}).get("time_zone"),
    }
    return {k: v for k, v in found.items() if v}


def build_test_database(path: str | Path) -> Path:
    """Write a small City database covering :data:`TEST_NETWORKS`."""
    import netaddr
    from mmdb_writer import MMDBWriter

    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-City", description="mergetag test database")
    for network, record in TEST_NETWORKS.items():
        writer.insert_network(netaddr.IPSet([network]), record)
    writer.to_db_file(str(path))
    return Path(path)
