"""FG-DM: condition-factor adapters, palettes and maps, recall and SBPC selection, map editing."""
