"""ft-prog transforms: Model -> Model functions that stack."""
