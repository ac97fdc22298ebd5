"""What reads a finished run: metrics (`metrics`: point estimates with bootstrap intervals;
`stats`: analytic intervals and paired tests), evaluation of a split (`evaluation`), prediction
for new studies (`prediction`), explanation maps (`maps`: the mathematics; `explanation`: over
patients, with overlays), comparison of two runs (`comparison`) and figures (`plots`).
"""
