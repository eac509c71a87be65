"""The admin API: configuration (``config``), argument checks and protobuf conversions
(``convert``), token authentication (``auth``), the typed Admin servicer (``service``) and the
gRPC server hosting it with the health service (``server``). Layered in that order."""
