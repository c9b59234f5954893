"""Static files of the operator's console (served by :mod:`service.api.console` at ``/console``)."""
