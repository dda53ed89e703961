package main

import (
	"encoding/csv"
	"fmt"
	"image/color"
	"os"
	"strconv"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

// writeCSV writes one row per second: requests by status column and the
// tokens held at the end of the second (empty if never sampled).
func writeCSV(path string, seconds []second) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("write csv: %w", err)
	}
	w := csv.NewWriter(f)
	header := append([]string{"second"}, colNames[:]...)
	_ = w.Write(append(header, "tokens_held"))
	for i, s := range seconds {
		row := []string{strconv.Itoa(i)}
		for _, c := range s.counts {
			row = append(row, strconv.Itoa(c))
		}
		held := ""
		if s.held >= 0 {
			held = strconv.Itoa(s.held)
		}
		_ = w.Write(append(row, held))
	}
	w.Flush()
	if err := w.Error(); err != nil {
		f.Close()
		return fmt.Errorf("write csv: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write csv: %w", err)
	}
	return nil
}

// colColors gives each status column the same colour in every chart.
var colColors = [numCols]color.Color{
	colOK:    color.RGBA{R: 0x1a, G: 0x9e, B: 0x4a, A: 0xff},
	col429:   color.RGBA{R: 0xf0, G: 0x8c, B: 0x00, A: 0xff},
	col503:   color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff},
	colOther: color.RGBA{R: 0x80, G: 0x40, B: 0xc0, A: 0xff},
	colError: color.RGBA{A: 0xff},
}

// writeChart draws requests per second by status over the run, one step
// line per status that occurred (200 always): each second is a flat segment
// at its count, so a run of two seconds reads as well as one of sixty.
func writeChart(path string, rep report) error {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("tokend herd: %s, %d clients — requests per second by status", rep.Scenario, rep.Clients)
	p.X.Label.Text = "seconds since the scenario started"
	p.Y.Label.Text = "requests per second"
	p.Y.Min = 0
	p.Legend.Top = true
	p.Add(plotter.NewGrid())
	// Head room above the peak keeps the legend off the lines.
	p.Y.Max = float64(max(rep.PeakRPS, 1)) * 1.15
	for col := range numCols {
		pts := make(plotter.XYs, len(rep.seconds)+1)
		total := 0
		for i, s := range rep.seconds {
			pts[i] = plotter.XY{X: float64(i), Y: float64(s.counts[col])}
			total += s.counts[col]
		}
		// The last second's segment ends where the run did.
		pts[len(rep.seconds)] = plotter.XY{X: max(rep.DurationS, float64(len(rep.seconds)-1)), Y: pts[max(len(rep.seconds)-1, 0)].Y}
		if total == 0 && col != colOK {
			continue
		}
		line, err := plotter.NewLine(pts)
		if err != nil {
			return fmt.Errorf("chart: %w", err)
		}
		line.StepStyle = plotter.PostStep
		line.Color = colColors[col]
		line.Width = vg.Points(1.5)
		p.Add(line)
		p.Legend.Add(colNames[col], line)
	}
	if err := p.Save(10*vg.Inch, 5*vg.Inch, path); err != nil {
		return fmt.Errorf("chart: %w", err)
	}
	return nil
}
